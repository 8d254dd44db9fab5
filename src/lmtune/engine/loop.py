"""The training loop shared by every gradient stage, top to bottom.

setup -> data -> model + method -> optimizer + schedule -> (resume) -> epochs of
accumulated steps with clipping, logging, evaluation, early stopping and
checkpoints -> final model, summary and loss-curve picture.

Stages plug in a loss (`summed loss`, `count`) and how examples become batches;
the loop owns everything else.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config.schema import Config
from ..data.batches import Batches
from ..data.pipeline import prepare
from ..errors import UserError
from ..model.load import context_length, load_model, load_model_config, load_tokenizer
from ..model.methods import apply_method, parameter_counts
from ..model.packed_attention import switch_to_packed
from ..stages import stage_for
from . import checkpoint
from .optim import build_optimizer, build_scheduler, warmup_steps
from .report import MetricsLog, plot_loss, read_metrics


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


@dataclass
class LoopState:
    """The loop's position and history, saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro batches of this epoch already trained
    best_metric: Optional[float] = None
    best_checkpoint: Optional[str] = None
    evals_without_gain: int = 0
    trained_tokens: int = 0
    real_tokens: int = 0  # non-padding positions computed (prompts included)
    stopped_early: bool = False


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    steps: int
    train_loss: Optional[float]
    eval_loss: Optional[float]
    best_checkpoint: Optional[str]
    seconds: float
    tokens_per_second: float
    notes: list[str]
    startup: dict[str, float]  # seconds of each phase from train() to the end of the first step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(config: Config) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may run several trainings (tests, eval after train): each sets its own precision.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    precision = config.precision.precision
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise TrainingError("precision: fp16 needs a CUDA GPU (loss scaling); on CPU use bf16 or fp32")
    if config.precision.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.distributed.enable_fsdp:
        raise TrainingError(
            "enable_fsdp: FSDP sharding is not in this version yet; train on one device, "
            "or launch several processes with `accelerate launch` / `torchrun` for data parallelism"
        )
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.distributed.ddp_timeout))
    return Accelerator(mixed_precision=mixed, cpu=not cuda, kwargs_handlers=[timeout])


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
    from tqdm.auto import tqdm

    t, o = config.training, config.output
    started = time.perf_counter()
    # peft calls a transformers method that transformers itself marks deprecated; nothing for our users to do.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
    notes: list[str] = []
    startup: dict[str, float] = {}
    phase_start = started

    def phase(name: str) -> None:
        nonlocal phase_start
        now = time.perf_counter()
        startup[name] = round(now - phase_start, 4)
        phase_start = now

    level = config.sagemaker.sagemaker_container_log_level
    if level is not None:  # a SageMaker job's logging level applies to the libraries' loggers too
        import logging

        from transformers.utils import logging as hf_logging

        logging.getLogger().setLevel(level)
        hf_logging.set_verbosity(level)
    seed_everything(t.seed)
    accelerator = make_accelerator(config)
    main_process = accelerator.is_main_process
    stage = stage_for(config)

    # -- run folder ---------------------------------------------------------
    run_dir = Path(o.output_dir)
    checkpoints = run_dir / "checkpoints"
    resume = resume or o.resume_from_checkpoint
    if resume is None and (run_dir / "metrics.jsonl").exists() and not o.overwrite_output_dir:
        raise TrainingError(
            f"output_dir: {run_dir} already holds a run; pass --resume to continue it, "
            "set overwrite_output_dir: true to start over, or choose another folder"
        )
    if main_process:
        if resume is None and run_dir.exists() and o.overwrite_output_dir:
            # Starting over: nothing of the old run may be mistaken for this one's (a later --resume included).
            for stale in ("metrics.jsonl", "summary.json"):
                (run_dir / stale).unlink(missing_ok=True)
            for stale in ("checkpoints", "final", "plots", "tensorboard"):
                shutil.rmtree(run_dir / stale, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config.flat(), sort_keys=False))

    # -- data -----------------------------------------------------------------
    # The data step checks max_input_length against the model's context before any weight loads.
    phase("setup")
    tokenizer = load_tokenizer(config)
    phase("tokenizer")
    data = prepare(config, tokenizer, context_length(load_model_config(config)), config_dir)
    phase("data")
    if not quiet and main_process:
        for line in data.summary.lines():
            print(f"data: {line}")

    # -- model and method -----------------------------------------------------
    model = load_model(config, head=stage.head)
    phase("model load")
    packing, packing_note = switch_to_packed(model, config.data.packing if stage.packs else False)
    if packing_note:
        notes.append(packing_note)
        if not quiet and main_process:
            print(f"note: packing: {packing_note}")
    train_batches = stage.batches(data.train, config, tokenizer, shuffle=True, packing=packing)
    eval_batches = stage.batches(data.val, config, tokenizer, shuffle=False, for_eval=True, packing=packing) if data.val else None
    if not quiet and main_process:
        layout = "packed without padding" if packing else f"padding {train_batches.padding_fraction():.1%} of the positions"
        print(f"data: training batches {layout}")
    model = apply_method(model, config)
    trainable, total = parameter_counts(model)
    if trainable == 0:
        raise TrainingError("method: no parameter is trainable; check the method settings")
    if not quiet and main_process:
        print(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%}) with {config.finetuning.method}")
    model.train()

    # -- optimisation ---------------------------------------------------------
    accum = t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_batches) / accum)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    warm = warmup_steps(t, total_steps)
    if warm > total_steps:
        notes.append(f"warmup ({warm} steps) is longer than the run ({total_steps} steps): the learning rate never peaks")
        if not quiet and main_process:
            print(f"warning: warmup_steps: {notes[-1]}")
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if hasattr(stage, "prepare"):  # dpo: the reference policy, before any weight moves
        stage.prepare(model, [b for b in (train_batches, eval_batches) if b is not None])
    phase("method and optimizer")
    if t.torch_compile:
        model = torch.compile(model)
    eval_steps, eval_each_epoch = eval_every(config, steps_per_epoch, eval_batches is not None)
    save_steps = o.save_steps

    # -- resume ---------------------------------------------------------------
    state = LoopState()
    if resume:
        path = checkpoint.latest(checkpoints) if resume == "latest" else Path(resume)
        if path is None or not (path / "state.json").exists():
            raise TrainingError(f"resume_from_checkpoint: no complete checkpoint at {resume if path is None else path}")
        state = LoopState(
            **checkpoint.load(path, accelerator.unwrap_model(model), optimizer, scheduler, scaler=accelerator.scaler)
        )
        if main_process:  # what the interrupted run logged after this checkpoint is logged again now
            kept = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= state.global_step]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        if not quiet and main_process:
            print(f"resumed from {path} at step {state.global_step}")
    elif main_process:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(run_dir, "tensorboard" in o.report_to, enabled=main_process)
    if log.note:
        notes.append(log.note)

    def save_checkpoint() -> Path:
        accelerator.wait_for_everyone()
        path = checkpoints / f"{checkpoint.PREFIX}{state.global_step}"
        if main_process:
            path = checkpoint.save(
                checkpoints,
                state.global_step,
                accelerator.unwrap_model(model),
                optimizer,
                scheduler,
                state.__dict__,
                scaler=accelerator.scaler,
            )
            checkpoint.prune(checkpoints, o.save_total_limit, protect=state.best_checkpoint)
        return path

    last_eval: dict[str, Any] = {}

    def run_eval() -> bool:
        """Evaluate, track the best checkpoint; True when early stopping says stop."""
        metrics = evaluate(model, stage, eval_batches, accelerator)
        last_eval.update(metrics, step=state.global_step)
        log.write({"step": state.global_step, "epoch": state.epoch, **metrics})
        value = metrics.get(t.early_stopping_metric, metrics["eval_loss"])
        improved = state.best_metric is None or value < state.best_metric - t.early_stopping_min_delta
        if improved:
            state.best_metric, state.evals_without_gain = value, 0
            state.best_checkpoint = str(save_checkpoint())
        else:
            state.evals_without_gain += 1
        bar.set_postfix_str(f"eval {metrics['eval_loss']:.4f}", refresh=False)
        patience = t.early_stopping_patience
        return patience is not None and state.evals_without_gain >= patience

    # -- the loop ---------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=state.global_step, desc="training", unit="step", disable=quiet or not main_process)
    window_loss, window_tokens = 0.0, 0
    window_metrics: dict[str, float] = {}
    window_start = time.perf_counter()
    last_loss: Optional[float] = None
    world = accelerator.num_processes
    while state.global_step < total_steps and not state.stopped_early:
        micro = train_batches.epoch(state.epoch, skip=state.micro_in_epoch)
        while state.global_step < total_steps:
            group = [b for _, b in zip(range(accum), micro)]
            if not group:
                break
            # Normalise by the trained tokens of the whole accumulated batch (over all processes),
            # so accumulation and data parallelism give the gradients of one big batch.
            tokens = sum(stage.count(b) for b in group)
            state.real_tokens += sum(real_tokens(b) for b in group)
            global_tokens = tokens
            if world > 1:
                global_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
            scale = world / max(global_tokens, 1)
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            step_metrics: dict[str, torch.Tensor] = {}
            for index, batch in enumerate(group):
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                last = index == len(group) - 1
                with accelerator.no_sync(model) if (world > 1 and not last) else nullcontext():
                    with accelerator.autocast():
                        summed, metrics = stage.summed_loss(model, batch)
                    accelerator.backward(summed * scale)
                step_loss += summed.detach().double()
                for name, value in metrics.items():
                    step_metrics[name] = step_metrics.get(name, 0) + value.detach().double()
            if t.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            grad_norm = torch.as_tensor(grad_norm, device=step_loss.device)
            # One device-to-host transfer per optimizer step, for the divergence check and the log.
            summed_value, norm_value, *metric_values = torch.stack([step_loss, grad_norm.double(), *step_metrics.values()]).tolist()
            loss_value = summed_value / max(tokens, 1)
            # With fp16 loss scaling an inf gradient is routine: the scaler skips that step and
            # lowers the scale. Elsewhere a non-finite gradient means the run has diverged.
            scaled = accelerator.scaler is not None
            if not math.isfinite(loss_value) or (not scaled and not math.isfinite(norm_value)):
                bar.close()
                log.close()
                raise TrainingError(diverged_message(config, loss_value, state.global_step + 1, checkpoints))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.micro_in_epoch += len(group)
            state.trained_tokens += tokens
            window_loss += summed_value
            window_tokens += tokens
            for name, value in zip(step_metrics, metric_values):
                window_metrics[name] = window_metrics.get(name, 0.0) + value
            last_loss = loss_value
            bar.update(1)
            if "first step" not in startup:
                phase("first step")
            if on_step is not None:
                on_step(state)

            if state.global_step % o.logging_steps == 0 or state.global_step == total_steps:
                elapsed = time.perf_counter() - window_start
                loss = window_loss / max(window_tokens, 1)
                record = {
                    "step": state.global_step,
                    "epoch": round(state.epoch + state.micro_in_epoch / max(len(train_batches), 1), 4),
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": norm_value,
                    f"{stage.unit}_per_second": window_tokens * world / max(elapsed, 1e-9),
                    **{name: value / max(window_tokens, 1) for name, value in window_metrics.items()},
                }
                log.write(record)
                bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{record['lr']:.2e}", f"{stage.unit}/s": f"{record[f'{stage.unit}_per_second']:.0f}"})
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
                window_metrics = {}
            if eval_steps and state.global_step % eval_steps == 0 and run_eval():
                state.stopped_early = True
                break
            if save_steps and state.global_step % save_steps == 0:
                save_checkpoint()
        if state.stopped_early or state.micro_in_epoch < len(train_batches):
            break  # stopped early, or max_steps ended the run inside this epoch
        state.epoch += 1
        state.micro_in_epoch = 0
        if eval_each_epoch and run_eval():
            state.stopped_early = True
        if not save_steps and state.global_step < total_steps and not state.stopped_early:
            save_checkpoint()  # at the run's end final/ is written instead; nothing is left to resume
    bar.close()

    # -- outputs ---------------------------------------------------------------
    final_eval: dict[str, Any] = {}
    if eval_batches is not None:
        final_eval = dict(last_eval) if last_eval.get("step") == state.global_step else {}
        if not final_eval:
            final_eval = evaluate(model, stage, eval_batches, accelerator)
            log.write({"step": state.global_step, "epoch": state.epoch, **final_eval})
    final_dir = run_dir / "final"
    accelerator.wait_for_everyone()
    if main_process:
        save_final(accelerator.unwrap_model(model), tokenizer, config, final_dir)
    log.close()
    if main_process and o.plot_loss:
        note = plot_loss(run_dir / "metrics.jsonl", run_dir / "plots" / "loss.png")
        if note:
            notes.append(note)
    seconds = time.perf_counter() - started
    result = RunResult(
        run_dir=run_dir,
        final_dir=final_dir,
        steps=state.global_step,
        train_loss=last_loss,
        eval_loss=final_eval.get("eval_loss"),
        best_checkpoint=state.best_checkpoint,
        seconds=seconds,
        tokens_per_second=state.trained_tokens / max(seconds, 1e-9),
        startup=startup,
        notes=notes + ([f"stopped early after {state.evals_without_gain} evaluations without improvement"] if state.stopped_early else []),
    )
    if main_process:
        (run_dir / "summary.json").write_text(
            json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()}, indent=2)
        )
    return result


def diverged_message(config: Config, loss: float, step: int, checkpoints: Path) -> str:
    good = checkpoint.latest(checkpoints)
    if config.precision.precision == "fp16":
        cause = "fp16 overflow is likely: use bf16, or lower learning_rate"
    else:
        cause = f"learning_rate {config.training.learning_rate:g} is likely too high, or a data row is broken"
    kept = f"The last good checkpoint is {good}." if good else "No checkpoint was saved before it."
    return f"loss became {loss} at step {step}: {cause}. {kept}"


def save_final(model: Any, tokenizer: Any, config: Config, final_dir: Path) -> None:
    """Hugging Face / PEFT formats: a LoRA adapter, or a full model, with the tokenizer beside it."""
    final_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "num_labels", None) == 1 and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a reward model: transformers finds the last token by it
    model.save_pretrained(final_dir, safe_serialization=True)
    tokenizer.save_pretrained(final_dir)
    meta = {
        "base_model": config.model.base_model,
        "method": config.finetuning.method,
        "stage": config.finetuning.stage,
        "template": config.data.template,
        "train_on_inputs": config.data.train_on_inputs,
        "add_input_output_demarcation_key": config.data.add_input_output_demarcation_key,
    }
    (final_dir / "lmtune.json").write_text(json.dumps(meta, indent=2))
