"""The shared training recipe of every stage that learns from a fixed dataset.

setup -> data -> model + method -> the stage's reference (if any) -> optimizer
+ schedule -> (resume) -> epochs of accumulated steps with clipping, logging,
evaluation, early stopping and checkpoints -> final model, summary and
loss-curve picture.

The stage's objective (stages/base.py) says how examples become micro batches,
what the summed loss is and what it is averaged over; the run folder, optimizer
step, checkpoints and outputs are `engine.run`'s, shared with the stages that
bring their own recipe. A stage with a recipe of its own runs that instead.
"""

from __future__ import annotations

import gc
import importlib
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..config.schema import Config
from ..data.batches import Batches, batch_layout
from ..model.compiled import compile_blocks
from ..model.load import load_model
from ..model.methods import apply_method, parameter_counts
from ..model.packed_attention import shares_prompts, switch_to_packed, switch_to_packed_rows
from ..stages import Objective, Stage, stage_of
from .run import (  # noqa: F401  (TrainingError, eval_every: the names tests and callers import from here)
    LoopState,
    Run,
    RunResult,
    TrainingError,
    closed_after,
    eval_every,
    save_final,
)


@torch.no_grad()
def evaluate(model: Any, objective: Objective, batches: Batches, accelerator: Any, unit: str) -> dict[str, float]:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches.epoch(0):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            summed, metrics = objective.summed_loss(model, batch)
        total += summed.double()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0) + value.double()
        count += objective.count(batch)
    model.train()
    loss = float(total) / max(count, 1)
    out = {"eval_loss": loss}
    if unit == "tokens":
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    averaged = objective.summarise({name: float(value) / max(count, 1) for name, value in sums.items()})
    out.update({f"eval_{name}": value for name, value in averaged.items()})
    return out


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    if "cu_seq_lens" in batch:
        return batch["input_ids"].numel()  # packed rows hold no padding
    return int(batch["attention_mask"].sum())


def train(
    config: Config,
    config_dir: Optional[Path] = None,
    resume: Optional[str] = None,
    quiet: bool = False,
    on_step: Optional[Callable[[LoopState], None]] = None,
) -> RunResult:
    """Run one training; `on_step` is called after every optimizer step (benchmarks, integrations)."""
    stage = stage_of(config)
    with closed_after():
        if stage.recipe is not None:
            module, _, function = stage.recipe.partition(":")
            recipe = getattr(importlib.import_module(module), function)
            return recipe(config, config_dir, resume=resume, quiet=quiet, on_step=on_step)
        with collection_paused() as set_up:
            loop = SharedLoop(config, stage, config_dir, resume, quiet, on_step)
            set_up()
            return loop.train()


@contextmanager
def collection_paused() -> Iterator[Callable[[], None]]:
    """No cyclic garbage collection while a run sets up. Importing transformers and peft and building the model
    make hundreds of thousands of objects, and the collector walks them again and again as they pile up: 0.35 s
    of a LoRA run's 4 s to its first step on a 2-core CPU (the tokenizer phase 1.1 -> 0.95 s, the model load
    0.63 -> 0.46 s). `set_up()` (the callable yielded) freezes what setup made, which later collections then skip
    (0.1 s less than collecting it once), and collection resumes for the steps. At the end they are unfrozen, so a
    process running one training after another (a notebook, a sweep) still gets each run's garbage back."""
    enabled, frozen_before = gc.isenabled(), gc.get_freeze_count()
    gc.disable()

    def set_up() -> None:
        gc.freeze()
        if enabled:
            gc.enable()

    try:
        yield set_up
    finally:
        if enabled:
            gc.enable()
        if not frozen_before:  # someone else's freeze (before a fork, ...) stays theirs
            gc.unfreeze()


class SharedLoop:
    """One run of the shared recipe: `__init__` sets everything up, `train` runs the steps and writes the outputs."""

    def __init__(self, config: Config, stage: Stage, config_dir: Optional[Path], resume: Optional[str], quiet: bool,
                 on_step: Optional[Callable[[LoopState], None]]):
        self.config, self.stage, self.on_step = config, stage, on_step
        self.run = run = Run(config, resume, quiet)
        self.objective = objective = stage.objective(config)
        self.tokenizer, data = run.tokenizer_and_data(config_dir)
        model = self._model_and_batches(data)
        t = config.training
        self.rank, self.world = run.accelerator.process_index, run.accelerator.num_processes
        self.micro_per_step = t.gradient_accumulation_steps * self.world  # each process takes every world-th micro batch
        self.steps_per_epoch = math.ceil(len(self.train_batches) / self.micro_per_step)
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * self.steps_per_epoch)
        # A stage's reference is taken from the starting weights, before they are placed, sharded or updated.
        objective.prepare(model, [b for b in (self.train_batches, self.eval_batches) if b is not None], run, data.folder)
        self.model = run.prepare(model, self.total_steps, objective.called_apart(model) if run.sharded else [])
        self.accelerator = run.accelerator
        run.phase("method and optimizer")
        if t.torch_compile:
            blocks = compile_blocks(self.model)
            run.say(f"model: torch_compile: {blocks} decoder blocks compiled in place (the first steps take longer while they compile)")
        self.eval_steps, self.eval_each_epoch = eval_every(config, self.steps_per_epoch, self.eval_batches is not None)
        run.resume_or_start()
        self.state = run.state
        self.last_eval: dict[str, Any] = {}
        self.spare: Optional[dict[str, torch.Tensor]] = None  # a batch for the passes a process runs with weight 0
        self.shown: dict[str, str] = {}  # what the progress bar shows after the bar: loss, lr, speed, last eval loss

    def _model_and_batches(self, data: Any) -> torch.nn.Module:
        """The model with the stage's head and the method applied, and the micro batches laid out for it."""
        config, run, stage = self.config, self.run, self.stage
        model = load_model(config, head=stage.head)
        run.phase("model load")
        layout: dict[str, Any] = {}
        if config.data.pack_to_length:
            switch_to_packed_rows(model)
            layout.update(packing=True, pack_length=data.summary.max_len)
        else:
            packing, packing_note = switch_to_packed(model, config.data.packing if stage.packs else False)
            if packing_note:
                run.note(packing_note, "packing")
            layout["packing"] = packing
        if stage.shares_prompts:
            layout["share_prompts"] = layout["packing"] and shares_prompts(model)
        tokenizer = self.tokenizer
        self.train_batches = self.objective.batches(data.train, config, tokenizer, shuffle=True, **layout)
        self.eval_batches = (
            self.objective.batches(data.val, config, tokenizer, shuffle=False, for_eval=True, **layout) if data.val else None
        )
        accumulated = config.training.gradient_accumulation_steps * run.accelerator.num_processes
        run.say(f"data: training batches {batch_layout(self.train_batches, accumulated)}")
        model = apply_method(model, config)
        trainable, total = parameter_counts(model)
        if trainable == 0:
            raise TrainingError("method: no parameter is trainable; check the method settings")
        run.say(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {config.finetuning.method}")
        model.train()
        return model

    def step(self, micro: Any) -> tuple[float, float, int, dict[str, float]]:
        """One optimizer step over this process's share of `micro_per_step` micro batches.
        Returns (summed loss, gradient norm, units counted, summed metrics), all over every process."""
        state, accelerator, objective = self.state, self.accelerator, self.objective
        step_micro = min(self.micro_per_step, len(self.train_batches) - state.micro_in_epoch)
        group = [next(micro) for _ in range(self.rank, step_micro, self.world)]
        # At an epoch's end some processes have one micro batch fewer: they run a pass with weight 0,
        # so every process joins the same gradient exchanges (no hang, no change to the gradients).
        passes = len(range(0, step_micro, self.world))
        if group:
            self.spare = group[-1]
        elif self.spare is None:  # this process has had no batch of its own yet (more processes than micro batches)
            self.spare = self.train_batches.collate(self.train_batches.examples[:1])
        # Normalise by the units of the whole accumulated batch (over all processes),
        # so accumulation and data parallelism give the gradients of one big batch.
        counts = torch.tensor([sum(objective.count(b) for b in group), sum(real_tokens(b) for b in group)], device=accelerator.device)
        if self.world > 1:
            counts = accelerator.reduce(counts, "sum")
        units, computed = (int(c) for c in counts.tolist())
        state.real_tokens += computed
        scale = self.world / max(units, 1)
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        step_metrics: dict[str, torch.Tensor] = {}
        for index in range(passes):
            weight = scale if index < len(group) else 0.0
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in (group[index] if weight else self.spare).items()}
            with self.run.no_sync(last=index == passes - 1):
                with accelerator.autocast():
                    summed, metrics = objective.summed_loss(self.model, batch)
                accelerator.backward(summed * weight)
            counted = 1.0 if weight else 0.0  # a weight-0 pass adds zeros, so every process sums the same metric names
            step_loss += summed.detach().double() * counted
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0) + value.detach().double() * counted
        summed_value, norm_value, metric_values = self.run.optimizer_step(step_loss, units, list(step_metrics.values()))
        state.global_step += 1
        state.micro_in_epoch += step_micro
        state.trained_tokens += units
        return summed_value, norm_value, units, dict(zip(step_metrics, metric_values))

    def evaluate_now(self) -> bool:
        """Evaluate, track the best checkpoint; True when early stopping says stop."""
        t, state, run = self.config.training, self.state, self.run
        metrics = evaluate(self.model, self.objective, self.eval_batches, self.accelerator, self.stage.unit)
        self.last_eval = {**metrics, "step": state.global_step}
        run.log.write({"step": state.global_step, "epoch": state.epoch, **metrics})
        value = metrics.get(t.early_stopping_metric, metrics["eval_loss"])
        improved = state.best_metric is None or value < state.best_metric - t.early_stopping_min_delta
        if improved:
            state.best_metric, state.evals_without_gain = value, 0
            state.best_checkpoint = str(run.save_checkpoint())
        else:
            state.evals_without_gain += 1
        self.shown["eval"] = f"{metrics['eval_loss']:.4f}"  # beside the training loss, not in its place
        run.bar.set_postfix(self.shown, refresh=False)
        patience = t.early_stopping_patience
        return patience is not None and state.evals_without_gain >= patience

    def train(self) -> RunResult:
        state, run, o = self.state, self.run, self.config.output
        bar = run.progress(self.total_steps)
        window = Window(self.stage.unit)
        last_loss: Optional[float] = None
        while state.global_step < self.total_steps and not state.stopped_early:
            micro = self.train_batches.epoch(state.epoch, skip=state.micro_in_epoch, rank=self.rank, ranks=self.world)
            while state.global_step < self.total_steps and state.micro_in_epoch < len(self.train_batches):
                began = time.perf_counter()
                summed, norm, units, metrics = self.step(micro)
                last_loss = summed / max(units, 1)
                window.add(summed, units, metrics, time.perf_counter() - began)
                bar.update(1)
                if "first step" not in run.startup:
                    run.phase("first step")
                if self.on_step is not None:
                    self.on_step(state)
                if state.global_step % o.logging_steps == 0 or state.global_step == self.total_steps:
                    self._log(window, norm)
                if self.eval_steps and state.global_step % self.eval_steps == 0 and self.evaluate_now():
                    state.stopped_early = True
                    break
                if o.save_steps and state.global_step % o.save_steps == 0:
                    run.save_checkpoint()
                run.end_of_step(self.total_steps)
            if state.stopped_early or state.micro_in_epoch < len(self.train_batches):
                break  # stopped early, or max_steps ended the run inside this epoch
            state.epoch += 1
            state.micro_in_epoch = 0
            if self.eval_each_epoch and self.evaluate_now():
                state.stopped_early = True
            if not o.save_steps and state.global_step < self.total_steps and not state.stopped_early:
                run.save_checkpoint()  # at the run's end final/ is written instead; nothing is left to resume
        bar.close()
        return self._finish(last_loss, window.total_units / max(window.total_seconds, 1e-9))

    def _log(self, window: "Window", norm: float) -> None:
        state, run = self.state, self.run
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch + state.micro_in_epoch / max(len(self.train_batches), 1), 4),
            **window.record(self.objective, run.learning_rate, norm),
        }
        run.log.write(record)
        unit = self.stage.unit
        self.shown.update({"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", f"{unit}/s": f"{record[f'{unit}_per_second']:.0f}"})
        run.bar.set_postfix(self.shown)

    def _finish(self, last_loss: Optional[float], step_speed: float) -> RunResult:
        state, run = self.state, self.run
        final_eval: dict[str, Any] = {}
        if self.eval_batches is not None:
            final_eval = dict(self.last_eval) if self.last_eval.get("step") == state.global_step else {}
            if not final_eval:
                final_eval = evaluate(self.model, self.objective, self.eval_batches, self.accelerator, self.stage.unit)
                run.log.write({"step": state.global_step, "epoch": state.epoch, **final_eval})
        if state.stopped_early:
            run.notes.append(f"stopped early after {state.evals_without_gain} evaluations without improvement")
        model, tokenizer, config = self.accelerator.unwrap_model(self.model), self.tokenizer, self.config
        return run.finish(
            lambda folder, whole: save_final(model, tokenizer, config, folder, whole),
            train_loss=last_loss,
            eval_loss=final_eval.get("eval_loss"),
            counted=state.trained_tokens,
            step_speed=step_speed,
        )


class Window:
    """What is logged every `logging_steps`: the loss and metrics over the window's units, and its speed."""

    def __init__(self, unit: str):
        self.unit = unit
        self.total_seconds, self.total_units = 0.0, 0  # in the steps of this process's run (for the summary's speed)
        self._reset()

    def _reset(self) -> None:
        self.loss, self.units, self.metrics, self.seconds = 0.0, 0, {}, 0.0

    def add(self, summed: float, units: int, metrics: dict[str, float], seconds: float) -> None:
        self.loss += summed
        self.units += units
        self.seconds += seconds
        self.total_seconds += seconds
        self.total_units += units
        for name, value in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value

    def record(self, objective: Objective, lr: float, norm: float) -> dict[str, Any]:
        count = max(self.units, 1)
        out = {
            "loss": self.loss / count,
            "lr": lr,
            "grad_norm": norm,
            # over the window's steps only: an evaluation or a checkpoint between them is not training speed
            f"{self.unit}_per_second": self.units / max(self.seconds, 1e-9),
            **objective.summarise({name: value / count for name, value in self.metrics.items()}),
        }
        self._reset()
        return out
