"""The ppo recipe, top to bottom.

setup -> prompts -> policy + value head (+ reference) -> reward source ->
optimizer -> (resume) -> iterations of: roll out `ppo_buffer_size` mini-batches
of prompts, score the answers, turn scores and the KL to the reference into
per-token rewards and advantages, then `ppo_epochs` passes of clipped updates
over the buffer -> final policy (HF / PEFT) with the value head beside it.

One logged step is one iteration. The reference is the starting policy: the
adapter switched off with LoRA, a frozen copy otherwise. Dropout is off for the
whole run, so the probability ratio compares one function at two points.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from ...config.schema import Config
from ...engine.loop import eval_every
from ...engine.run import LoopState, Run, RunResult, TrainingError, save_final
from ...model.load import load_model
from ...model.methods import apply_method, parameter_counts
from .objective import AdaptiveKL, RunningMoments, gae, policy_loss, token_rewards, value_loss, whiten
from .rewards import reward_source
from .rollout import PolicyAndValue, Rollout, prompts_for, sample_answers, token_statistics


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
    f, t, g = config.finetuning, config.training, config.generation
    run = Run(config, resume, quiet, state=PPOState(kl_coef=f.ppo_kl_coef))

    # -- prompts --------------------------------------------------------------
    tokenizer, data = run.tokenizer_and_data(config_dir)
    prompts = [[int(t) for t in e["input_ids"]] for e in data.train]
    if not prompts:
        raise TrainingError("dataset: no prompt is left to roll out; see the data summary above")

    # -- policy, value head, reference, rewards ---------------------------------
    model = load_model(config)
    run.phase("model load")
    adapters = f.method in ("lora", "qlora")
    reference = None if adapters else copy.deepcopy(model).eval().requires_grad_(False)
    model = apply_method(model, config)
    actor_critic = PolicyAndValue(model, model.config.hidden_size).to(next(model.parameters()).device)
    trainable, total = parameter_counts(actor_critic)
    if trainable == 0:
        raise TrainingError("method: no parameter is trainable; check the method settings")
    run.say(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {f.method}, a value head included")
    actor_critic.eval()  # dropout off (see the module's docstring)

    per_iteration = t.micro_batch_size * t.gradient_accumulation_steps * f.ppo_buffer_size
    iterations_per_epoch = math.ceil(len(prompts) / per_iteration)
    iterations = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * iterations_per_epoch)
    actor_critic = run.prepare(actor_critic, iterations * f.ppo_epochs * f.ppo_buffer_size)
    accelerator = run.accelerator
    device = accelerator.device
    if reference is not None:
        reference.to(device)
    score = reward_source(config, config_dir, tokenizer, device)
    run.phase("method and optimizer")
    run.resume_or_start()
    state: PPOState = run.state
    kl_control = AdaptiveKL(state.kl_coef, f.ppo_target_kl)
    moments = RunningMoments(state.score_mean, state.score_var, state.score_count)
    unwrapped = accelerator.unwrap_model(actor_critic)
    policy, value_head = unwrapped.policy, unwrapped.value_head

    def reference_logps(rollout: Rollout) -> torch.Tensor:
        with torch.no_grad(), (policy.disable_adapter() if adapters else nullcontext()):
            logps, _, _ = token_statistics(policy if adapters else reference, None, rollout, g.temperature, with_entropy=False)
        return logps

    def roll_out(indices: list[int], source: list[list[int]]) -> Rollout:
        rollout = sample_answers(policy, tokenizer, [source[i] for i in indices], g, device)
        texts = [tokenizer.decode(source[i], skip_special_tokens=True) for i in indices]
        answers = [tokenizer.decode(a[m.bool()], skip_special_tokens=True) for a, m in zip(rollout.answers, rollout.answer_mask)]
        sequences = [row[mask.bool()].tolist() for row, mask in zip(rollout.input_ids, rollout.attention_mask)]
        rollout.scores = score(texts, answers, sequences).to(device)
        return rollout

    def evaluate_rollouts() -> dict[str, float]:
        """Fresh answers to the held-out prompts, sampled from a fixed seed (the training RNG is left as it was)."""
        val = [[int(t) for t in e["input_ids"]] for e in data.val]
        scores, lengths = [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(t.seed)
            for start in range(0, len(val), config.evaluation.per_device_eval_batch_size):
                rollout = roll_out(list(range(start, min(start + config.evaluation.per_device_eval_batch_size, len(val)))), val)
                scores.append(rollout.scores)
                lengths.append(rollout.answer_mask.sum(1).float())
        return {"eval_reward_mean": float(torch.cat(scores).mean()), "eval_response_length": float(torch.cat(lengths).mean())}

    eval_steps, eval_each_epoch = eval_every(config, iterations_per_epoch, bool(data.val))
    evaluating = bool(eval_steps or eval_each_epoch)
    if evaluating and state.global_step == 0:  # where the policy starts, for the curve to be read against
        run.log.write({"step": 0, "epoch": 0, **evaluate_rollouts()})

    # -- the loop ---------------------------------------------------------------
    bar = run.progress(iterations, unit="iteration")
    last_loss: Optional[float] = None
    last_eval: dict[str, float] = {}
    while state.global_step < iterations:
        started = time.perf_counter()
        # Roll out the buffer: micro batches of prompts, scored, with the policy's, reference's and value head's view.
        indices = prompts_for(state.global_step, per_iteration, len(prompts), t.seed)
        buffer: list[Rollout] = []
        with torch.no_grad():
            for start in range(0, per_iteration, t.micro_batch_size):
                rollout = roll_out(indices[start : start + t.micro_batch_size], prompts)
                rollout.old_logps, rollout.entropy, rollout.values = token_statistics(policy, value_head, rollout, g.temperature)
                rollout.ref_logps = reference_logps(rollout)
                buffer.append(rollout)
        raw_scores = torch.cat([r.scores for r in buffer])
        if f.ppo_score_norm:
            moments.update(raw_scores)
        kl_per_answer = torch.cat([((r.old_logps - r.ref_logps) * r.answer_mask).sum(1) for r in buffer])
        for rollout in buffer:
            scores = moments.normalise(rollout.scores) if f.ppo_score_norm else rollout.scores
            rewards = token_rewards(scores, rollout.old_logps, rollout.ref_logps, rollout.answer_mask, kl_control.value)
            rollout.advantages, rollout.returns = gae(rewards, rollout.values, rollout.answer_mask, f.ppo_gamma, f.ppo_lam)
        # Advantages whitened over the whole buffer.
        flat_adv = torch.cat([r.advantages.flatten() for r in buffer])
        flat_mask = torch.cat([r.answer_mask.flatten() for r in buffer]).float()
        white = whiten(flat_adv, flat_mask)
        at = 0
        for rollout in buffer:
            n = rollout.advantages.numel()
            rollout.advantages = white[at : at + n].view_as(rollout.advantages)
            at += n

        # Optimise: ppo_epochs passes over the buffer in mini-batches of micro_batch x accumulation rollouts.
        sums = {name: 0.0 for name in ("loss", "policy_loss", "value_loss", "clip_fraction")}
        tokens_seen = 0
        accum = t.gradient_accumulation_steps
        for _ in range(f.ppo_epochs):
            order = torch.randperm(len(buffer)).tolist()
            for first in range(0, len(order), accum):
                group = [buffer[i] for i in order[first : first + accum]]
                tokens = int(sum(r.answer_mask.sum() for r in group))
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                parts = torch.zeros(3, dtype=torch.float64, device=device)
                for rollout in group:
                    mask = rollout.answer_mask.float()
                    with accelerator.autocast():
                        logps, _, values = token_statistics(policy, value_head, rollout, g.temperature, with_entropy=False)
                    pg, clipped = policy_loss(logps, rollout.old_logps, rollout.advantages, f.ppo_clip_range)
                    vf = value_loss(values, rollout.values, rollout.returns, f.ppo_value_clip)
                    per_token = (pg + f.ppo_value_coef * vf) * mask
                    accelerator.backward(per_token.sum() / max(tokens, 1))
                    step_loss += per_token.sum().detach().double()
                    parts += torch.stack([(pg * mask).sum(), (vf * mask).sum(), (clipped * mask).sum()]).detach().double()
                summed, _, (pg_sum, vf_sum, clip_sum) = run.optimizer_step(step_loss, tokens, list(parts))
                for name, value in zip(sums, (summed, pg_sum, vf_sum, clip_sum)):
                    sums[name] += value
                tokens_seen += tokens

        # Log the iteration; move the controllers.
        answers = len(raw_scores)
        kl_mean = float(kl_per_answer.mean())
        state.kl_coef = kl_control.update(kl_mean, answers)
        state.score_mean, state.score_var, state.score_count = moments.mean, moments.var, moments.count
        state.global_step += 1
        state.epoch = state.global_step * per_iteration // len(prompts)
        answer_tokens = int(sum(r.answer_mask.sum() for r in buffer))
        state.trained_tokens += answer_tokens
        state.real_tokens += int(sum(r.attention_mask.sum() for r in buffer))
        last_loss = sums["loss"] / max(tokens_seen, 1)
        record = {
            "step": state.global_step,
            "epoch": round(state.global_step * per_iteration / len(prompts), 4),
            "loss": last_loss,
            "policy_loss": sums["policy_loss"] / max(tokens_seen, 1),
            "value_loss": sums["value_loss"] / max(tokens_seen, 1),
            "clip_fraction": sums["clip_fraction"] / max(tokens_seen, 1),
            "reward_mean": float(raw_scores.mean()),
            "reward_std": float(raw_scores.std(unbiased=False)),
            "kl": kl_mean,
            "kl_coef": state.kl_coef,
            "entropy": float(sum((r.entropy * r.answer_mask).sum() for r in buffer) / max(answer_tokens, 1)),
            "response_length": answer_tokens / answers,
            "lr": run.learning_rate,
            "answers_per_second": answers / max(time.perf_counter() - started, 1e-9),
        }
        run.log.write(record)
        bar.update(1)
        bar.set_postfix({"reward": f"{record['reward_mean']:.3f}", "kl": f"{kl_mean:.3f}"})
        if "first step" not in run.startup:
            run.phase("first step")
        if on_step is not None:
            on_step(state)
        at_epoch_end = state.global_step % iterations_per_epoch == 0
        if evaluating and ((eval_steps and state.global_step % eval_steps == 0) or (eval_each_epoch and at_epoch_end)):
            last_eval = {"step": state.global_step, **evaluate_rollouts()}
            run.log.write({"epoch": record["epoch"], **last_eval})
        if config.output.save_steps and state.global_step % config.output.save_steps == 0 and state.global_step < iterations:
            run.save_checkpoint()
    bar.close()

    # -- outputs ---------------------------------------------------------------
    if evaluating and last_eval.get("step") != state.global_step:
        last_eval = {"step": state.global_step, **evaluate_rollouts()}
        run.log.write({"epoch": state.epoch, **last_eval})

    def save(folder: Path, _whole: Any) -> None:  # ppo runs in one process: nothing to gather
        save_final(policy, tokenizer, config, folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, folder / "value_head.safetensors")

    return run.finish(save, train_loss=last_loss, eval_loss=None, counted=state.trained_tokens)
