"""The ppo recipe, top to bottom.

setup -> prompts -> policy + value head (+ reference) -> reward source ->
optimizer -> (resume) -> iterations of: roll out the buffer's micro batches of
prompts, score the answers, turn scores and the KL to the reference into
per-token rewards and advantages, then `ppo_epochs` passes of clipped updates
over the buffer -> final policy (HF / PEFT) with the value head beside it.

One logged step is one iteration. The reference is the starting policy
(stages/reference.py). Dropout is off for the whole run, so the probability
ratio compares one function at two points.

Several processes: an iteration rolls out `micro_batch_size x accumulation x
ppo_buffer_size x processes` prompts of one global order; micro batch m is
sampled by process m mod processes from a seed of its own (seed, iteration, m),
so the answers do not depend on the process count. Every process then holds the
whole buffer (gathered), computes the same advantages, and takes its share of
each mini-batch of a seeded permutation; gradients are averaged as in the
shared loop. A resumed run, and a run with another process count, therefore
continue the same curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file

from ...config.schema import Config
from ...engine.run import LoopState, Run, RunResult, TrainingError, eval_every, save_final
from ...model.load import load_model
from ...model.methods import apply_method, parameter_counts
from ..reference import Reference
from ..rl.prompts import prompts_for
from ..rl.rewards import reward_source
from ..rl.sampling import seeded
from .objective import AdaptiveKL, RunningMoments, gae, policy_loss, token_rewards, value_loss, whiten
from .rollout import PolicyAndValue, Rollout, sample_answers, token_statistics


@dataclass
class PPOState(LoopState):
    """The loop's position plus the controllers' state, so a resumed run continues the same curve."""

    kl_coef: float = 0.0
    score_mean: float = 0.0
    score_var: float = 1.0
    score_count: float = 0.0


def train_ppo(
    config: Config,
    config_dir: Optional[Path] = None,
    resume: Optional[str] = None,
    quiet: bool = False,
    on_step: Optional[Callable[[LoopState], None]] = None,
) -> RunResult:
    return PPORecipe(config, config_dir, resume, quiet, on_step).train()


class PPORecipe:
    def __init__(self, config: Config, config_dir: Optional[Path], resume: Optional[str], quiet: bool,
                 on_step: Optional[Callable[[LoopState], None]]):
        f, t = config.finetuning, config.training
        self.config, self.on_step = config, on_step
        self.run = run = Run(config, resume, quiet, state=PPOState(kl_coef=f.ppo_kl_coef))
        self.tokenizer, self.data = run.tokenizer_and_data(config_dir)
        self.prompts = [[int(t) for t in e["input_ids"]] for e in self.data.train]
        if not self.prompts:
            raise TrainingError("dataset: no prompt is left to roll out; see the data summary above")
        model = load_model(config)
        run.phase("model load")
        self.reference = Reference(model, f.method, run)  # the starting weights, before the adapter or any update
        model = apply_method(model, config)
        actor_critic = PolicyAndValue(model, model.config.hidden_size)
        trainable, total = parameter_counts(actor_critic)
        if trainable == 0:
            raise TrainingError("method: no parameter is trainable; check the method settings")
        run.say(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {f.method}, a value head included")
        actor_critic.eval()  # dropout off (see the module's docstring)
        self.world, self.rank = run.world, run.accelerator.process_index
        self.micro_batches = t.gradient_accumulation_steps * f.ppo_buffer_size * self.world  # per iteration, all processes
        self.per_iteration = t.micro_batch_size * self.micro_batches
        self.iterations_per_epoch = math.ceil(len(self.prompts) / self.per_iteration)
        self.iterations = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.iterations_per_epoch)
        apart = [actor_critic.policy, actor_critic.value_head] if run.sharded else []
        actor_critic = run.prepare(actor_critic, self.iterations * f.ppo_epochs * f.ppo_buffer_size, apart)
        self.device = run.accelerator.device
        self.score = reward_source(config, config_dir, self.tokenizer, self.device)
        run.phase("method and optimizer")
        run.resume_or_start()
        self.state: PPOState = run.state
        self.kl_control = AdaptiveKL(self.state.kl_coef, f.ppo_target_kl)
        self.moments = RunningMoments(self.state.score_mean, self.state.score_var, self.state.score_count)
        unwrapped = run.accelerator.unwrap_model(actor_critic)
        self.policy, self.value_head = unwrapped.policy, unwrapped.value_head

    # -- rollouts -----------------------------------------------------------------

    def roll_out(self, indices: list[int], source: list[list[int]], seed: int) -> Rollout:
        """Answers sampled for these prompts from `seed` (the training RNG is left as it was), scored."""
        g, tokenizer = self.config.generation, self.tokenizer
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            rollout = sample_answers(self.policy, tokenizer, [source[i] for i in indices], g, self.device, synced=self.run.sharded)
        texts = [tokenizer.decode(source[i], skip_special_tokens=True) for i in indices]
        answers = [tokenizer.decode(a[m.bool()], skip_special_tokens=True) for a, m in zip(rollout.answers, rollout.answer_mask)]
        sequences = [row[mask.bool()].tolist() for row, mask in zip(rollout.input_ids, rollout.attention_mask)]
        rollout.scores = self.score(texts, answers, sequences).to(self.device)
        return rollout

    def buffer(self) -> list[Rollout]:
        """This iteration's rollouts, every process's, in micro batch order; this process samples its share."""
        t, g, state = self.config.training, self.config.generation, self.state
        indices = prompts_for(state.global_step, self.per_iteration, len(self.prompts), t.seed)
        mine: list[tuple[int, Rollout]] = []
        with torch.no_grad():
            for m in range(self.rank, self.micro_batches, self.world):
                chunk = indices[m * t.micro_batch_size : (m + 1) * t.micro_batch_size]
                rollout = self.roll_out(chunk, self.prompts, seeded(t.seed, state.global_step, m))
                rollout.old_logps, rollout.entropy, rollout.values = token_statistics(self.policy, self.value_head, rollout, g.temperature)
                with self.reference.policy(self.policy) as reference:
                    rollout.ref_logps = token_statistics(reference, None, rollout, g.temperature, with_entropy=False)[0]
                mine.append((m, rollout))
        if self.world == 1:
            return [r for _, r in mine]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, [(m, r.to("cpu")) for m, r in mine])
        return [r.to(self.device) for _, r in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]

    def advantages(self, buffer: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rewards, GAE and advantages whitened over the whole buffer; returns (raw scores, KL per answer)."""
        f = self.config.finetuning
        raw_scores = torch.cat([r.scores for r in buffer])
        if f.ppo_score_norm:
            self.moments.update(raw_scores)
        kl_per_answer = torch.cat([((r.old_logps - r.ref_logps) * r.answer_mask).sum(1) for r in buffer])
        for rollout in buffer:
            scores = self.moments.normalise(rollout.scores) if f.ppo_score_norm else rollout.scores
            rewards = token_rewards(scores, rollout.old_logps, rollout.ref_logps, rollout.answer_mask, self.kl_control.value)
            rollout.advantages, rollout.returns = gae(rewards, rollout.values, rollout.answer_mask, f.ppo_gamma, f.ppo_lam)
        white = whiten(torch.cat([r.advantages.flatten() for r in buffer]), torch.cat([r.answer_mask.flatten() for r in buffer]).float())
        at = 0
        for rollout in buffer:
            n = rollout.advantages.numel()
            rollout.advantages = white[at : at + n].view_as(rollout.advantages)
            at += n
        return raw_scores, kl_per_answer

    # -- optimisation -------------------------------------------------------------

    def optimise(self, buffer: list[Rollout]) -> tuple[dict[str, float], int]:
        """`ppo_epochs` passes over the buffer in mini-batches of accumulation x processes micro batches, in a seeded
        order; this process computes its share of each. Returns the summed losses (all processes) and their tokens."""
        f, t, g = self.config.finetuning, self.config.training, self.config.generation
        sums = {name: 0.0 for name in ("loss", "policy_loss", "value_loss", "clip_fraction")}
        tokens_seen = 0
        per_step = t.gradient_accumulation_steps * self.world
        for epoch in range(f.ppo_epochs):
            order = torch.randperm(len(buffer), generator=torch.Generator().manual_seed(seeded(t.seed, self.state.global_step, epoch, 1)))
            for first in range(0, len(order), per_step):
                step = [buffer[i] for i in order[first : first + per_step].tolist()]
                tokens = int(sum(r.answer_mask.sum() for r in step))
                step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                parts = torch.zeros(3, dtype=torch.float64, device=self.device)
                mine = step[self.rank :: self.world]
                for index, rollout in enumerate(mine):
                    mask = rollout.answer_mask.float()
                    with self.run.no_sync(last=index == len(mine) - 1), self.run.accelerator.autocast():
                        logps, _, values = token_statistics(self.policy, self.value_head, rollout, g.temperature, with_entropy=False)
                        pg, clipped = policy_loss(logps, rollout.old_logps, rollout.advantages, f.ppo_clip_range)
                        vf = value_loss(values, rollout.values, rollout.returns, f.ppo_value_clip)
                        per_token = (pg + f.ppo_value_coef * vf) * mask
                        # Gradients are averaged over the processes: each scales its share by their number.
                        self.run.accelerator.backward(per_token.sum() * self.world / max(tokens, 1))
                    step_loss += per_token.sum().detach().double()
                    parts += torch.stack([(pg * mask).sum(), (vf * mask).sum(), (clipped * mask).sum()]).detach().double()
                summed, _, (pg_sum, vf_sum, clip_sum) = self.run.optimizer_step(step_loss, tokens, list(parts), expect_gradient=False)
                for name, value in zip(sums, (summed, pg_sum, vf_sum, clip_sum)):
                    sums[name] += value
                tokens_seen += tokens
        return sums, tokens_seen

    # -- the loop -----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Fresh answers to the held-out prompts, each micro batch sampled from a fixed seed (every process the same)."""
        size = self.config.evaluation.per_device_eval_batch_size
        val = [[int(t) for t in e["input_ids"]] for e in self.data.val]
        scores, lengths = [], []
        with torch.no_grad():
            for start in range(0, len(val), size):
                chunk = list(range(start, min(start + size, len(val))))
                rollout = self.roll_out(chunk, val, seeded(self.config.training.seed, start, 2))
                scores.append(rollout.scores)
                lengths.append(rollout.answer_mask.sum(1).float())
        return {"eval_reward_mean": float(torch.cat(scores).mean()), "eval_response_length": float(torch.cat(lengths).mean())}

    def train(self) -> RunResult:
        run, state, o = self.run, self.state, self.config.output
        eval_steps, eval_each_epoch = eval_every(self.config, self.iterations_per_epoch, bool(self.data.val))
        evaluating = bool(eval_steps or eval_each_epoch)
        if evaluating and state.global_step == 0:  # where the policy starts, for the curve to be read against
            run.log.write({"step": 0, "epoch": 0, **self.evaluate()})
        bar = run.progress(self.iterations, unit="iteration")
        last_loss: Optional[float] = None
        last_eval: dict[str, float] = {}
        while state.global_step < self.iterations:
            started = time.perf_counter()
            buffer = self.buffer()
            raw_scores, kl_per_answer = self.advantages(buffer)
            sums, tokens_seen = self.optimise(buffer)
            record = self.record(buffer, raw_scores, kl_per_answer, sums, tokens_seen, started)
            last_loss = record["loss"]
            run.log.write(record)
            bar.update(1)
            bar.set_postfix({"reward": f"{record['reward_mean']:.3f}", "kl": f"{record['kl']:.3f}"})
            if "first step" not in run.startup:
                run.phase("first step")
            if self.on_step is not None:
                self.on_step(state)
            at_epoch_end = state.global_step % self.iterations_per_epoch == 0
            if evaluating and ((eval_steps and state.global_step % eval_steps == 0) or (eval_each_epoch and at_epoch_end)):
                last_eval = {"step": state.global_step, **self.evaluate()}
                run.log.write({"epoch": record["epoch"], **last_eval})
            if o.save_steps and state.global_step % o.save_steps == 0 and state.global_step < self.iterations:
                run.save_checkpoint()
            run.end_of_step(self.iterations)
        bar.close()
        if evaluating and last_eval.get("step") != state.global_step:
            run.log.write({"epoch": state.epoch, "step": state.global_step, **self.evaluate()})
        return run.finish(self.save, train_loss=last_loss, eval_loss=None, counted=state.trained_tokens)

    def record(self, buffer: list[Rollout], raw_scores: torch.Tensor, kl_per_answer: torch.Tensor, sums: dict[str, float],
               tokens_seen: int, started: float) -> dict[str, Any]:
        """Move the controllers and the loop's position; the iteration's line of metrics.jsonl."""
        state = self.state
        answers = len(raw_scores)
        kl_mean = float(kl_per_answer.mean())
        state.kl_coef = self.kl_control.update(kl_mean, answers)
        state.score_mean, state.score_var, state.score_count = self.moments.mean, self.moments.var, self.moments.count
        state.global_step += 1
        state.epoch = state.global_step * self.per_iteration // len(self.prompts)
        answer_tokens = int(sum(r.answer_mask.sum() for r in buffer))
        state.trained_tokens += answer_tokens
        state.real_tokens += int(sum(r.attention_mask.sum() for r in buffer))
        seen = max(tokens_seen, 1)
        return {
            "step": state.global_step,
            "epoch": round(state.global_step * self.per_iteration / len(self.prompts), 4),
            "loss": sums["loss"] / seen,
            "policy_loss": sums["policy_loss"] / seen,
            "value_loss": sums["value_loss"] / seen,
            "clip_fraction": sums["clip_fraction"] / seen,
            "reward_mean": float(raw_scores.mean()),
            "reward_std": float(raw_scores.std(unbiased=False)),
            "kl": kl_mean,
            "kl_coef": state.kl_coef,
            "entropy": float(sum((r.entropy * r.answer_mask).sum() for r in buffer) / max(answer_tokens, 1)),
            "response_length": answer_tokens / answers,
            "lr": self.run.learning_rate,
            "answers_per_second": answers / max(time.perf_counter() - started, 1e-9),
        }

    def save(self, folder: Path, whole: Optional[dict[str, torch.Tensor]]) -> None:
        """The policy in HF / PEFT format and the value head beside it; `whole`: the gathered weights when sharded."""
        policy_state = head_state = None
        if whole is not None:
            policy_state = {k.removeprefix("policy."): v for k, v in whole.items() if k.startswith("policy.")}
            head_state = {k.removeprefix("value_head."): v for k, v in whole.items() if k.startswith("value_head.")}
        save_final(self.policy, self.tokenizer, self.config, folder, policy_state)
        head_state = head_state or {k: v.detach() for k, v in self.value_head.state_dict().items()}
        save_file({k: v.cpu().contiguous() for k, v in head_state.items()}, folder / "value_head.safetensors")

