"""The training recipe of every stage that learns from a fixed dataset: pt, sft, rm and dpo.

setup -> data -> model + method -> optimizer + schedule -> (resume) -> epochs of
accumulated steps with clipping, logging, evaluation, early stopping and
checkpoints -> final model, summary and loss-curve picture.

Stages plug in a loss (`summed_loss`, `count`) and how examples become batches;
the run folder, optimizer step, checkpoints and outputs are `engine.run`'s,
shared with ppo's recipe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config.schema import Config
from ..data.batches import Batches, batch_layout
from ..model.load import load_model
from ..model.methods import apply_method, parameter_counts
from ..model.packed_attention import shares_prompts, switch_to_packed, switch_to_packed_rows
from ..stages import stage_for
from .run import (  # noqa: F401  (TrainingError: the name tests and callers import from here)
    LoopState,
    Run,
    RunResult,
    TrainingError,
    save_final,
)


def eval_every(config: Config, steps_per_epoch: int, has_val: bool) -> tuple[Optional[int], bool]:
    """(evaluate every N steps, evaluate at each epoch end)."""
    e = config.evaluation
    strategy = e.eval_strategy or ("epoch" if has_val else "no")
    if strategy == "no" or not has_val:
        return None, False
    if e.evals_per_epoch:
        return max(1, steps_per_epoch // e.evals_per_epoch), False
    if strategy == "steps":
        return e.eval_steps, False
    return None, True


@torch.no_grad()
def evaluate(model: Any, stage: Any, batches: Batches, accelerator: Any) -> dict[str, float]:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in batches.epoch(0):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            summed, metrics = stage.summed_loss(model, batch)
        total += summed.double()
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0) + value.double()
        count += stage.count(batch)
    model.train()
    loss = float(total) / max(count, 1)
    out = {"eval_loss": loss}
    if stage.unit == "tokens":
        out["eval_perplexity"] = math.exp(min(loss, 50.0))
    out.update({f"eval_{name}": float(value) / max(count, 1) for name, value in sums.items()})
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
    if config.finetuning.stage == "ppo":
        from ..stages.ppo.train import train_ppo

        return train_ppo(config, config_dir, resume=resume, quiet=quiet, on_step=on_step)
    t, o = config.training, config.output
    run = Run(config, resume, quiet)
    stage = stage_for(config)

    # -- data -----------------------------------------------------------------
    tokenizer, data = run.tokenizer_and_data(config_dir)

    # -- model and method -----------------------------------------------------
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
    if getattr(stage, "shares_prompts", False):
        layout["share_prompts"] = layout["packing"] and shares_prompts(model)
    train_batches = stage.batches(data.train, config, tokenizer, shuffle=True, **layout)
    eval_batches = stage.batches(data.val, config, tokenizer, shuffle=False, for_eval=True, **layout) if data.val else None
    run.say(f"data: training batches {batch_layout(train_batches, t.gradient_accumulation_steps * run.accelerator.num_processes)}")
    model = apply_method(model, config)
    trainable, total = parameter_counts(model)
    if trainable == 0:
        raise TrainingError("method: no parameter is trainable; check the method settings")
    run.say(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {config.finetuning.method}")
    model.train()

    # -- optimisation ---------------------------------------------------------
    accum = t.gradient_accumulation_steps
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    micro_per_step = accum * world  # each process takes every world-th micro batch of one global order
    steps_per_epoch = math.ceil(len(train_batches) / micro_per_step)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    model = run.prepare(model, total_steps)
    accelerator = run.accelerator
    if hasattr(stage, "prepare"):  # dpo: the reference policy, before any weight moves
        stage.prepare(model, [b for b in (train_batches, eval_batches) if b is not None], cache_folder=data.folder)
    run.phase("method and optimizer")
    if t.torch_compile:
        model = torch.compile(model)
    eval_steps, eval_each_epoch = eval_every(config, steps_per_epoch, eval_batches is not None)
    save_steps = o.save_steps
    run.resume_or_start()
    state = run.state
    last_eval: dict[str, Any] = {}

    def run_eval() -> bool:
        """Evaluate, track the best checkpoint; True when early stopping says stop."""
        metrics = evaluate(model, stage, eval_batches, accelerator)
        last_eval.update(metrics, step=state.global_step)
        run.log.write({"step": state.global_step, "epoch": state.epoch, **metrics})
        value = metrics.get(t.early_stopping_metric, metrics["eval_loss"])
        improved = state.best_metric is None or value < state.best_metric - t.early_stopping_min_delta
        if improved:
            state.best_metric, state.evals_without_gain = value, 0
            state.best_checkpoint = str(run.save_checkpoint())
        else:
            state.evals_without_gain += 1
        bar.set_postfix_str(f"eval {metrics['eval_loss']:.4f}", refresh=False)
        patience = t.early_stopping_patience
        return patience is not None and state.evals_without_gain >= patience

    # -- the loop ---------------------------------------------------------------
    bar = run.progress(total_steps)
    window_loss, window_tokens = 0.0, 0
    window_metrics: dict[str, float] = {}
    window_start = time.perf_counter()
    last_loss: Optional[float] = None
    spare: Optional[dict[str, torch.Tensor]] = None  # a batch for the passes a process runs with weight 0
    while state.global_step < total_steps and not state.stopped_early:
        micro = train_batches.epoch(state.epoch, skip=state.micro_in_epoch, rank=rank, ranks=world)
        while state.global_step < total_steps:
            step_micro = min(micro_per_step, len(train_batches) - state.micro_in_epoch)
            if step_micro <= 0:
                break
            group = [next(micro) for _ in range(rank, step_micro, world)]
            # At an epoch's end some processes have one micro batch fewer: they run a pass with weight 0,
            # so every process joins the same gradient exchanges (no hang, no change to the gradients).
            passes = len(range(0, step_micro, world))
            if group:
                spare = group[-1]
            elif spare is None:  # this process has had no batch of its own yet (more processes than micro batches)
                spare = train_batches.collate(train_batches.examples[:1])
            # Normalise by the trained tokens of the whole accumulated batch (over all processes),
            # so accumulation and data parallelism give the gradients of one big batch.
            counts = torch.tensor([sum(stage.count(b) for b in group), sum(real_tokens(b) for b in group)], device=accelerator.device)
            if world > 1:
                counts = accelerator.reduce(counts, "sum")
            tokens, computed = (int(c) for c in counts.tolist())
            state.real_tokens += computed
            scale = world / max(tokens, 1)
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            step_metrics: dict[str, torch.Tensor] = {}
            for index in range(passes):
                weight = scale if index < len(group) else 0.0
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in (group[index] if weight else spare).items()}
                with run.no_sync(last=index == passes - 1):
                    with accelerator.autocast():
                        summed, metrics = stage.summed_loss(model, batch)
                    accelerator.backward(summed * weight)
                counted = 1.0 if weight else 0.0  # a weight-0 pass adds zeros, so every process sums the same metric names
                step_loss += summed.detach().double() * counted
                for name, value in metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0) + value.detach().double() * counted
            summed_value, norm_value, metric_values = run.optimizer_step(step_loss, tokens, list(step_metrics.values()))
            loss_value = summed_value / max(tokens, 1)
            state.global_step += 1
            state.micro_in_epoch += step_micro
            state.trained_tokens += tokens
            window_loss += summed_value
            window_tokens += tokens
            for name, value in zip(step_metrics, metric_values):
                window_metrics[name] = window_metrics.get(name, 0.0) + value
            last_loss = loss_value
            bar.update(1)
            if "first step" not in run.startup:
                run.phase("first step")
            if on_step is not None:
                on_step(state)

            if state.global_step % o.logging_steps == 0 or state.global_step == total_steps:
                elapsed = time.perf_counter() - window_start
                loss = window_loss / max(window_tokens, 1)
                record = {
                    "step": state.global_step,
                    "epoch": round(state.epoch + state.micro_in_epoch / max(len(train_batches), 1), 4),
                    "loss": loss,
                    "lr": run.learning_rate,
                    "grad_norm": norm_value,
                    f"{stage.unit}_per_second": window_tokens / max(elapsed, 1e-9),
                    **{name: value / max(window_tokens, 1) for name, value in window_metrics.items()},
                }
                run.log.write(record)
                bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}", f"{stage.unit}/s": f"{record[f'{stage.unit}_per_second']:.0f}"})
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
                window_metrics = {}
            if eval_steps and state.global_step % eval_steps == 0 and run_eval():
                state.stopped_early = True
                break
            if save_steps and state.global_step % save_steps == 0:
                run.save_checkpoint()
        if state.stopped_early or state.micro_in_epoch < len(train_batches):
            break  # stopped early, or max_steps ended the run inside this epoch
        state.epoch += 1
        state.micro_in_epoch = 0
        if eval_each_epoch and run_eval():
            state.stopped_early = True
        if not save_steps and state.global_step < total_steps and not state.stopped_early:
            run.save_checkpoint()  # at the run's end final/ is written instead; nothing is left to resume
    bar.close()

    # -- outputs ---------------------------------------------------------------
    final_eval: dict[str, Any] = {}
    if eval_batches is not None:
        final_eval = dict(last_eval) if last_eval.get("step") == state.global_step else {}
        if not final_eval:
            final_eval = evaluate(model, stage, eval_batches, accelerator)
            run.log.write({"step": state.global_step, "epoch": state.epoch, **final_eval})
    if state.stopped_early:
        run.notes.append(f"stopped early after {state.evals_without_gain} evaluations without improvement")
    return run.finish(
        lambda folder, whole: save_final(accelerator.unwrap_model(model), tokenizer, config, folder, whole),
        train_loss=last_loss,
        eval_loss=final_eval.get("eval_loss"),
        counted=state.trained_tokens,
    )
