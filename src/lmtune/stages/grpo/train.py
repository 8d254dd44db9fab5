"""The grpo recipe, top to bottom.

setup -> prompts (with their other columns) -> policy (+ reference when beta > 0) -> reward sources ->
optimizer -> (resume) -> steps of: sample `num_generations` answers for each of the step's prompts (each prompt
computed once for its group), score them with every reward, turn the weighted rewards into group-relative
advantages, then `num_iterations` optimizer updates over the answers against their sampling log-probabilities
-> final policy (HF / PEFT).

One logged step is one batch of sampled answers: `micro_batch_size x gradient_accumulation_steps x processes`
answers to that many / num_generations prompts, in an order that is a function of the step. On several processes
group g is sampled by process g mod processes from a seed of its own, the answers and rewards are gathered so
every process computes the same advantages, and process r trains micro batches r, r + processes, ... of the step;
gradients are averaged as in the shared loop. Dropout is off, so the ratio compares one function at two points.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ...config.schema import Config
from ...data.tokenize import example_columns, example_prompt_text
from ...engine.run import LoopState, Run, RunResult, TrainingError, eval_every, save_final
from ...generate import stop_ids
from ...model.load import load_model
from ...model.methods import apply_method, parameter_counts
from ...model.packed_attention import shares_prompts, switch_to_packed
from ..reference import Reference
from ..rl.prompts import prompts_for
from ..rl.rewards import reward_sources
from ..rl.sampling import generators_for, sample_groups, seeded
from .batches import Answer, answer_token_logps, collate
from .loss import group_advantages, token_terms, token_weights

SHOWN_PER_LOG = 4  # sampled answers written to completions.jsonl per logging step


@dataclass
class PromptSet:
    """Tokenised prompts with what reward functions get beside the answers: each prompt's text and other columns."""

    ids: list[list[int]]
    texts: list[str]
    columns: list[dict[str, Any]]

    @classmethod
    def of(cls, examples: list[dict[str, Any]]) -> "PromptSet":
        return cls([[int(t) for t in e["input_ids"]] for e in examples], [example_prompt_text(e) for e in examples],
                   [example_columns(e) for e in examples])


def train_grpo(
    config: Config,
    config_dir: Optional[Path] = None,
    resume: Optional[str] = None,
    quiet: bool = False,
    on_step: Optional[Callable[[LoopState], None]] = None,
) -> RunResult:
    return GRPORecipe(config, config_dir, resume, quiet, on_step).train()


class GRPORecipe:
    def __init__(self, config: Config, config_dir: Optional[Path], resume: Optional[str], quiet: bool,
                 on_step: Optional[Callable[[LoopState], None]]):
        f, t = config.finetuning, config.training
        self.config, self.on_step = config, on_step
        self.run = run = Run(config, resume, quiet)
        self.tokenizer, self.data = run.tokenizer_and_data(config_dir)
        if self.data.summary.outcomes.get("truncated"):
            raise TrainingError(f"max_input_length: {self.data.summary.outcomes['truncated']} prompts are longer than "
                                f"{self.data.summary.max_len} tokens; raise max_input_length or shorten those prompts")
        self.train_prompts, self.val_prompts = PromptSet.of(self.data.train), PromptSet.of(self.data.val)
        self.prompts = self.train_prompts.ids
        model = load_model(config)
        run.phase("model load")
        self.packing, note = switch_to_packed(model, config.data.packing)
        if note:
            run.note(note, "packing")
        self.share_prompts = self.packing and shares_prompts(model)
        self.reference = Reference(model, f.method, run) if f.beta > 0 else None  # the KL's reference, when weighed
        model = apply_method(model, config)
        trainable, total = parameter_counts(model)
        if trainable == 0:
            raise TrainingError("method: no parameter is trainable; check the method settings")
        run.say(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {f.method}")
        model.eval()  # dropout off (see the module's docstring)
        self.world, self.rank = run.world, run.accelerator.process_index
        self.answers_per_step = t.micro_batch_size * t.gradient_accumulation_steps * self.world
        self.prompts_per_step = self.answers_per_step // f.num_generations
        self.steps_per_epoch = math.ceil(len(self.prompts) / self.prompts_per_step)
        self.steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.steps_per_epoch)
        self.model = run.prepare(model, self.steps * f.num_iterations)
        self.device = run.accelerator.device
        self.policy = run.accelerator.unwrap_model(self.model)
        self.rewards = reward_sources(config, config_dir, self.tokenizer, self.device)
        self.weights = torch.tensor(f.reward_weights or [1.0] * len(self.rewards))
        self.stops = stop_ids(self.tokenizer, self.policy)
        run.say(f"grpo: {self.prompts_per_step} prompts x {f.num_generations} answers per step, rewards: "
                + ", ".join(r.spec for r in self.rewards))
        run.phase("method and optimizer")
        run.resume_or_start()
        self.state = run.state
        shown = run.dir / "completions.jsonl"
        if run.main and shown.exists():  # what an interrupted run showed after its checkpoint is shown again
            kept = [line for line in shown.read_text().splitlines() if json.loads(line)["step"] <= self.state.global_step]
            shown.write_text("".join(line + "\n" for line in kept) if run.resume_from else "")

    # -- sampling and rewards -------------------------------------------------------

    def sample(self, source: "PromptSet", rows: list[int], seeds: list[int], group: int) -> list[Answer]:
        """`group` answers to each of these prompts (row i's from seeds[i]), scored by every reward."""
        g = self.config.generation
        prompts = [source.ids[row] for row in rows]
        sampled = sample_groups(self.policy, prompts, group, g, self.stops, self.tokenizer.pad_token_id,
                                generators_for(seeds), self.device, synced=self.run.sharded)
        tokens = sampled.answer_ids()
        answer_rows = [row for row in rows for _ in range(group)]
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in tokens]
        prompt_texts = [source.texts[row] for row in answer_rows]
        names = sorted({k for row in set(answer_rows) for k in source.columns[row]})
        columns = {k: [source.columns[row].get(k) for row in answer_rows] for k in names}
        sequences = [prompts[i // group] + a for i, a in enumerate(tokens)]
        scores = torch.stack([source(prompt_texts, texts, sequences, columns, answer_rows).float().cpu() for source in self.rewards], 1)
        return [
            Answer(row, prompts[i // group], a, bool(sampled.truncated[i]), scores[i].tolist())
            for i, (row, a) in enumerate(zip(answer_rows, tokens))
        ]

    def step_answers(self) -> list[Answer]:
        """This step's answers, every process's, group after group; this process samples groups rank, rank + processes..."""
        f, t = self.config.finetuning, self.config.training
        rows = prompts_for(self.state.global_step, self.prompts_per_step, len(self.prompts), t.seed)
        mine = list(range(self.rank, len(rows), self.world))
        answers = self.sample(self.train_prompts, [rows[g] for g in mine], [seeded(t.seed, self.state.global_step, g, 3) for g in mine],
                              f.num_generations)
        if self.world > 1:
            groups = [(g, answers[i * f.num_generations : (i + 1) * f.num_generations]) for i, g in enumerate(mine)]
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, groups)
            answers = [a for _, group in sorted((p for part in gathered for p in part), key=lambda p: p[0]) for a in group]
        for answer in answers:
            answer.prompt = self.prompts[answer.row]  # one list per prompt again, after the gather
        return answers

    def advantages(self, answers: list[Answer]) -> dict[str, float]:
        f = self.config.finetuning
        scores = torch.tensor([a.rewards for a in answers])
        rewards = scores @ self.weights
        advantages, spread = group_advantages(rewards, f.num_generations, f.scale_rewards)
        for answer, reward, advantage in zip(answers, rewards.tolist(), advantages.tolist()):
            answer.reward, answer.advantage = reward, advantage
        lengths = torch.tensor([len(a.tokens) for a in answers], dtype=torch.float32)
        out = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "advantage_std": float(advantages.std()),
            "equal_reward_groups": float((spread < 1e-8).float().mean()),  # they give no gradient; counted here
            "completion_length": float(lengths.mean()),
            "truncated_share": float(torch.tensor([a.truncated for a in answers], dtype=torch.float32).mean()),
        }
        for index, source in enumerate(self.rewards):
            out[f"rewards/{source.spec}/mean"] = float(scores[:, index].mean())
            out[f"rewards/{source.spec}/std"] = float(scores[:, index].std())
        return out

    # -- optimisation -----------------------------------------------------------------

    def micro_batches(self, answers: list[Answer]) -> list[dict[str, Any]]:
        """This process's micro batches of the step, with the sampling (and reference) log-probabilities they need."""
        f, t, g = self.config.finetuning, self.config.training, self.config.generation
        size = t.micro_batch_size
        out = []
        for number in range(self.rank, len(answers) // size, self.world):
            chunk = answers[number * size : (number + 1) * size]
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.packing, self.share_prompts, self.tokenizer.pad_token_id).items()}
            lengths = batch["answer_lengths"]
            keep = torch.tensor([0.0 if (a.truncated and f.mask_truncated_completions) else 1.0 for a in chunk], device=self.device)
            entry = {"batch": batch, "answers": chunk, "answer_of": torch.repeat_interleave(torch.arange(len(chunk), device=self.device), lengths),
                     "advantages": torch.tensor([a.advantage for a in chunk], device=self.device)}
            entry["mask"] = keep[entry["answer_of"]]
            with torch.no_grad():
                if f.num_iterations > 1:  # later passes compare with the policy that sampled
                    entry["old_logps"] = answer_token_logps(self.model, batch, g.temperature)
                if self.reference is not None:
                    with self.reference.policy(self.model) as reference:
                        entry["ref_logps"] = answer_token_logps(reference, batch, g.temperature)
            out.append(entry)
        return out

    def update(self, micro: list[dict[str, Any]], answers: list[Answer]) -> dict[str, float]:
        """One optimizer step over this process's micro batches; the loss and token metrics over all processes."""
        f, t, g = self.config.finetuning, self.config.training, self.config.generation
        masks = [torch.tensor([0.0 if (a.truncated and f.mask_truncated_completions) else 1.0] * len(a.tokens)) for a in answers]
        step_tokens = int(sum(m.sum() for m in masks))
        size = t.micro_batch_size
        micro_tokens = [int(sum(masks[i].sum() for i in range(n * size, (n + 1) * size))) for n in range(len(answers) // size)]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, kl, clipped low, clipped high, tokens
        for index, entry in enumerate(micro):
            logps = answer_token_logps(self.model, entry["batch"], g.temperature)
            old = entry.get("old_logps", logps.detach())
            terms = token_terms(logps, old, entry["advantages"], entry["answer_of"], entry["mask"], len(entry["answers"]), f.epsilon,
                                f.epsilon_high or f.epsilon, f.importance_sampling_level == "sequence", entry.get("ref_logps"), f.beta)
            number = self.rank + index * self.world
            counted = torch.zeros(len(entry["answers"]), device=self.device).index_add(0, entry["answer_of"], entry["mask"])
            weights = token_weights(f.grpo_loss, entry["answer_of"], entry["mask"], counted, step_answers=len(answers),
                                    step_tokens=step_tokens, micro_tokens=micro_tokens[number],
                                    step_micro_batches=len(answers) // size, max_new_tokens=g.max_new_tokens)
            loss = (terms.loss * weights).sum()
            with self.run.no_sync(last=index == len(micro) - 1):
                self.run.accelerator.backward(loss * self.world)  # gradients are averaged over the processes
            mask = entry["mask"]
            kl = (terms.kl * mask).sum() if terms.kl is not None else mask.new_zeros(())
            sums += torch.stack([loss.detach(), kl.detach(), (terms.clipped_low * mask).sum(), (terms.clipped_high * mask).sum(),
                                 mask.sum()]).double()
        # Zero gradients are routine here (every answer of every group rewarded alike), not a collapse.
        summed, norm, (kl, low, high, tokens) = self.run.optimizer_step(sums[0], 1, list(sums[1:]), expect_gradient=False)
        out = {"loss": summed, "grad_norm": norm, "clip_ratio/low": low / max(tokens, 1), "clip_ratio/high": high / max(tokens, 1)}
        if self.reference is not None:
            out["kl"] = kl / max(tokens, 1)
        return out

    # -- the loop -----------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """One fresh answer to each held-out prompt, sampled from a fixed seed per prompt, scored by the rewards."""
        val = self.val_prompts
        if not val.ids:
            return {}
        size = self.config.evaluation.per_device_eval_batch_size
        answers: list[Answer] = []
        with torch.no_grad():
            for start in range(0, len(val.ids), size):
                rows = list(range(start, min(start + size, len(val.ids))))
                answers += self.sample(val, rows, [seeded(self.config.training.seed, r, 4) for r in rows], 1)
        scores = torch.tensor([a.rewards for a in answers])
        out = {"eval_reward_mean": float((scores @ self.weights).mean()),
               "eval_completion_length": sum(len(a.tokens) for a in answers) / len(answers)}
        for index, source in enumerate(self.rewards):
            out[f"eval_rewards/{source.spec}/mean"] = float(scores[:, index].mean())
        return out

    def train(self) -> RunResult:
        run, state, o, f = self.run, self.state, self.config.output, self.config.finetuning
        eval_steps, eval_each_epoch = eval_every(self.config, self.steps_per_epoch, bool(self.data.val))
        evaluating = bool(eval_steps or eval_each_epoch)
        if evaluating and state.global_step == 0:  # where the policy starts, for the curve to be read against
            run.log.write({"step": 0, "epoch": 0, **self.evaluate()})
        bar = run.progress(self.steps)
        last_loss: Optional[float] = None
        last_eval_step = -1
        while state.global_step < self.steps:
            started = time.perf_counter()
            answers = self.step_answers()
            record = self.advantages(answers)
            sampled = time.perf_counter()
            micro = self.micro_batches(answers)
            passes = [self.update(micro, answers) for _ in range(f.num_iterations)]
            updates = {name: sum(p[name] for p in passes) / len(passes) for name in passes[0]}  # the mean over the passes
            last_loss = updates["loss"]
            state.global_step += 1
            state.epoch = state.global_step * self.prompts_per_step // len(self.prompts)
            tokens = sum(len(a.tokens) for a in answers)
            state.trained_tokens += tokens
            state.real_tokens += tokens + sum(len(a.prompt) for a in answers)
            now = time.perf_counter()
            record = {"step": state.global_step, "epoch": round(state.global_step * self.prompts_per_step / len(self.prompts), 4),
                      **updates, **record, "lr": run.learning_rate, "answers_per_second": len(answers) / max(now - started, 1e-9),
                      "sampling_seconds": sampled - started, "training_seconds": now - sampled}
            if state.global_step % o.logging_steps == 0 or state.global_step == self.steps:
                run.log.write(record)
                self.show(answers)
            bar.update(1)
            bar.set_postfix({"reward": f"{record['reward_mean']:.3f}", "loss": f"{last_loss:.4f}"})
            if "first step" not in run.startup:
                run.phase("first step")
            if self.on_step is not None:
                self.on_step(state)
            at_epoch_end = state.global_step % self.steps_per_epoch == 0
            if evaluating and ((eval_steps and state.global_step % eval_steps == 0) or (eval_each_epoch and at_epoch_end)):
                run.log.write({"step": state.global_step, "epoch": record["epoch"], **self.evaluate()})
                last_eval_step = state.global_step
            if o.save_steps and state.global_step % o.save_steps == 0 and state.global_step < self.steps:
                run.save_checkpoint()
            run.end_of_step(self.steps)
        bar.close()
        if evaluating and last_eval_step != state.global_step:
            run.log.write({"step": state.global_step, "epoch": state.epoch, **self.evaluate()})
        return run.finish(self.save, train_loss=last_loss, eval_loss=None, counted=state.trained_tokens)

    def show(self, answers: list[Answer]) -> None:
        """A few of the step's answers with their rewards, in completions.jsonl (the main process writes it)."""
        if not self.run.main:
            return
        names = [source.spec for source in self.rewards]
        lines = [
            json.dumps({"step": self.state.global_step, "prompt": self.train_prompts.texts[a.row],
                        "completion": self.tokenizer.decode(a.tokens, skip_special_tokens=True),
                        "rewards": dict(zip(names, a.rewards)), "reward": a.reward, "advantage": a.advantage,
                        "truncated": a.truncated})
            for a in answers[:SHOWN_PER_LOG]
        ]
        with (self.run.dir / "completions.jsonl").open("a") as handle:
            handle.write("".join(line + "\n" for line in lines))

    def save(self, folder: Path, whole: Optional[dict[str, torch.Tensor]]) -> None:
        save_final(self.policy, self.tokenizer, self.config, folder, whole)
