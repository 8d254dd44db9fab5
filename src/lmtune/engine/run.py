"""What every training recipe does around its own steps.

A recipe (engine/loop.py, the shared loop, or a stage's own)
opens a `Run`, builds its data and model, and then calls these parts in order:
`prepare` (optimizer, schedule, devices), `resume_or_start`, `optimizer_step`
once per update, `save_checkpoint`, and `finish` (final model, plot, summary).
The run folder, start-up timing, the divergence check, checkpoints and the
outputs are therefore the same for every stage.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config.schema import Config
from ..errors import UserError
from ..staged_folder import remove_leftovers, staged_folder
from . import checkpoint, distributed
from .lock import FolderLock, RunLocked
from .preemption import CONTINUE, Stopped, StopSignals
from .resume import resume_problem
from .optim import build_optimizer, build_scheduler, warmup_steps
from ..stages import stage_of
from .report import MetricsLog, plot_loss, read_metrics
from ..model.load import own_mapped_weights


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


DIVERGENCE_PATIENCE = 5  # steps in a row with zero, or exploding, gradients before a run is stopped
EXPLOSION = 1000.0  # how far above the first steps' median norm a norm counts as exploding


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
    reference_grad_norm: Optional[float] = None  # the median of the first steps' norms, against which an explosion is seen


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
    step_speed: Optional[float] = None  # what the stage counts per second inside its steps (no start-up, evaluation, saving)


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
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.distributed.ddp_timeout))
    return Accelerator(mixed_precision=mixed, cpu=not cuda, kwargs_handlers=[timeout])


def set_cpu_allocator() -> None:
    """How glibc's malloc (torch's CPU allocator) serves and returns large blocks, fixed for the whole run.

    By default glibc serves a block over its mmap threshold with a mapping of its own, returned to the system when
    freed, and raises that threshold after each such free (up to 32 MiB), so how much comes from the heap drifts
    from step to step. Fixed at 32 MiB here: tensors up to 32 MiB (a 512-wide model's hidden states for rows of up
    to 16,000 tokens, a 4,096-wide one's up to 2,000) are reused from the heap every step; larger ones fault their
    pages in afresh each time. Measured on a 2-core VM, LoRA on the 27M-parameter benchmark model, 2 rows of
    4,096 tokens: 9.4 s a step at 32 MiB against 12.1 s at 16 MiB (1.1 to 1.5 million page faults a step there),
    peak 3,642 against 3,117 MiB; at 1,024 tokens or fewer no tensor reaches 16 MiB and nothing differs.
    Serving every block from the heap (M_MMAP_MAX 0) was not worth it: 9.0 s and 3,780 MiB at 4,096 tokens, and
    at 8,192 no faster than 16 MiB for a 6,820 MiB peak against 4,616.

    The trim threshold is fixed at 1 GiB: otherwise the heap's free top went back to the system after nearly every
    step and its pages were faulted in again on the next (100-140 thousand page faults per pre-training step).
    The heap top is kept instead, grown 64 MiB at a time."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD (glibc's largest); setting it stops glibc from moving it
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 64 * 2**20)  # M_TOP_PAD
    except (OSError, AttributeError):  # not glibc (musl, ...): its own allocator policy stays
        pass


def _quiet_libraries(config: Config) -> None:
    from ..model.load import quiet_library_warnings

    quiet_library_warnings()
    level = config.sagemaker.sagemaker_container_log_level
    if level is not None:
        import logging

        from transformers.utils import logging as hf_logging

        # A SageMaker job's level is lmtune's own. The libraries' loggers take it only above warning: their
        # info and debug output (config dumps, HTTP requests, file locks) would bury the job's log.
        library_level = max(level, logging.WARNING)
        logging.getLogger("lmtune").setLevel(level)
        logging.getLogger().setLevel(library_level)
        hf_logging.set_verbosity(library_level)


def in_sagemaker_job() -> bool:
    """Inside a SageMaker training container: no progress bar (its log keeps every redraw)."""
    import os

    return "SM_CURRENT_HOST" in os.environ or "SM_TRAINING_ENV" in os.environ


class Run:
    """One training run's folder, devices, log, optimizer and checkpoints; the recipe owns the steps."""

    def __init__(self, config: Config, resume: Optional[str] = None, quiet: bool = False, state: Any = None):
        self.config, self.quiet = config, quiet
        self.started = self._phase_start = time.perf_counter()
        self.startup: dict[str, float] = {}
        self.notes: list[str] = []
        _quiet_libraries(config)
        set_cpu_allocator()
        seed_everything(config.training.seed)
        self.accelerator = make_accelerator(config)
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        d = config.distributed
        self.sharded = self.world > 1 and d.enable_fsdp and d.fsdp_sharding_strategy != "no_shard"
        refusal = stage_of(config).layout_problem(config, self.world, self.sharded)
        if refusal:
            raise distributed.DistributedError(refusal)
        if config.distributed.enable_fsdp and self.world == 1:
            self.notes.append("one process: nothing to shard, so this trains as a single-process run")
            self.say(f"note: enable_fsdp: {self.notes[-1]}")
        self.dir = Path(config.output.output_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.resume_from = resume or config.output.resume_from_checkpoint
        self.state = state if state is not None else LoopState()
        self.log: Optional[MetricsLog] = None
        self.bar: Any = None
        self.lock = FolderLock(self.dir, sole_writer=in_sagemaker_job())
        self.signals = StopSignals()
        OPEN.append(self)
        self._norms: list[float] = []  # the norms of the current run of suspicious steps (zero, or exploding)
        self._first_norms: list[float] = []
        self._stop_agreed = False
        self.resume_path: Optional[Path] = None
        self._open_folder()

    # -- the folder, messages and timing --------------------------------------

    def _open_folder(self) -> None:
        o = self.config.output
        if self.main:
            try:
                self.lock.acquire()  # first: a live run's folder is not read, judged or cleaned by a second one
            except RunLocked as exc:
                raise TrainingError(str(exc)) from None
        try:
            self._check_folder()
        except BaseException:
            self.lock.release()
            raise
        if not self.main:
            return
        if self.resume_from is None and self.dir.exists() and o.overwrite_output_dir:
            # Starting over: nothing of the old run may be mistaken for this one's (a later --resume included).
            for stale in ("metrics.jsonl", "summary.json"):
                (self.dir / stale).unlink(missing_ok=True)
            for stale in ("checkpoints", "final", "plots", "tensorboard"):
                shutil.rmtree(self.dir / stale, ignore_errors=True)
        removed = remove_leftovers(self.checkpoints, checkpoint.PREFIX) + remove_leftovers(self.dir, "final")
        if removed:
            self.say(f"note: removed {removed} half-written folder(s) that an interrupted run left")
        import yaml

        (self.dir / "config.resolved.yaml").write_text(yaml.safe_dump(self.config.flat(), sort_keys=False))

    def _check_folder(self) -> None:
        """A new run does not write over an old one; a resume continues the run its folder holds, unchanged."""
        o = self.config.output
        if self.resume_from is None and (self.dir / "metrics.jsonl").exists() and not o.overwrite_output_dir:
            interrupted_early = not checkpoint.complete_checkpoints(self.checkpoints) and not (self.dir / "final").exists()
            how = "it stopped before its first checkpoint, so there is nothing to resume; " if interrupted_early else "pass --resume to continue it, "
            raise TrainingError(
                f"output_dir: {self.dir} already holds a run; {how}"
                "set overwrite_output_dir: true to start over, or choose another folder"
            )
        if self.resume_from is not None:
            # Before any data or weights load: a resume that has nothing to resume from says so now.
            self.resume_path = self._checkpoint_to_resume()
            problem = resume_problem(self.config, self.dir / "config.resolved.yaml", self.resume_path) if self.main else None
            if problem:
                raise TrainingError(problem)

    def say(self, line: str) -> None:
        if not self.quiet and self.main:
            print(line)

    def note(self, text: str, key: str = "note") -> None:
        """Something the user should know about this run: printed now and kept in summary.json."""
        self.notes.append(text)
        self.say(f"note: {key}: {text}" if key != "note" else f"note: {text}")

    def progress(self, total: int, unit: str = "step", desc: str = "training") -> Any:
        """The progress bar, from the step the run resumes at."""
        from tqdm.auto import tqdm

        hidden = self.quiet or not self.main or in_sagemaker_job()
        self.bar = tqdm(total=total, initial=self.state.global_step, desc=desc, unit=unit, disable=hidden)
        return self.bar

    def phase(self, name: str) -> None:
        """Close a start-up phase (setup, tokenizer, data, ...): its seconds go to summary.json."""
        now = time.perf_counter()
        self.startup[name] = round(now - self._phase_start, 4)
        self._phase_start = now

    def tokenizer_and_data(self, config_dir: Optional[Path]) -> tuple[Any, Any]:
        """The tokenizer and the tokenised data (from the cache when it holds them), each a timed phase.
        The data step checks max_input_length against the model's context before any weight loads."""
        from ..data.pipeline import prepare
        from ..model.load import context_length, load_model_config, load_tokenizer

        self.phase("setup")
        tokenizer = load_tokenizer(self.config)
        self.phase("tokenizer")
        with distributed.main_first(self.accelerator):  # one process writes the tokenised-data cache
            data = prepare(self.config, tokenizer, context_length(load_model_config(self.config)), config_dir,
                           self.accelerator.num_processes)
        self.phase("data")
        for line in data.summary.lines():
            self.say(f"data: {line}")
        return tokenizer, data

    # -- optimisation ---------------------------------------------------------

    def prepare(self, model: torch.nn.Module, total_steps: int, apart: list[torch.nn.Module] = ()) -> torch.nn.Module:
        """The optimizer and schedule for `total_steps` updates, and the model placed on its device(s); `apart`:
        submodules the loss calls on their own, which sharding makes units of their own."""
        t, d = self.config.training, self.config.distributed
        warm = warmup_steps(t, total_steps)
        if warm > total_steps:
            self.notes.append(f"warmup ({warm} steps) is longer than the run ({total_steps} steps): the learning rate never peaks")
            self.say(f"warning: warmup_steps: {self.notes[-1]}")
        if self.world > 1:
            global_batch = t.micro_batch_size * t.gradient_accumulation_steps * self.world
            layout = "FSDP2 (" + d.fsdp_sharding_strategy + ")" if self.sharded else "data parallel"
            if d.enable_fsdp and not self.sharded:
                layout += ", as fsdp_sharding_strategy no_shard asks"
            self.say(f"processes: {self.world}, {layout} over {self.accelerator.state.backend or 'one device'}; global batch "
                     f"{t.micro_batch_size} x {t.gradient_accumulation_steps} accumulation x {self.world} processes = {global_batch}")
        if self.sharded:
            model, notes = distributed.shard(model, self.config, self.accelerator, apart)
            for note in notes:
                self.note(note)
        else:
            # With several processes and no sharding, each keeps the whole model, unwrapped (gradients are
            # averaged in optimizer_step), so the loss can run the decoder and the head apart as in one process.
            model.to(self.accelerator.device)
            own_mapped_weights(model)
        self.optimizer = build_optimizer(model, t)  # over the sharded parameters, when sharded
        self.scheduler = build_scheduler(self.optimizer, t, total_steps)
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.model = model
        return model

    def place_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen model beside the policy (a reference): sharded like the policy, or whole on this device."""
        if self.sharded:
            return distributed.shard(module, self.config, self.accelerator)[0]
        return module.to(self.accelerator.device)

    def no_sync(self, last: bool) -> Any:
        """Around a micro batch's backward: FSDP2 exchanges gradients only on the step's last one."""
        return distributed.gradient_sync(self.model, sync=last)

    def optimizer_step(self, summed_loss: torch.Tensor, count: int, metrics: list[torch.Tensor] = (),
                       expect_gradient: bool = True) -> tuple[float, float, list[float]]:
        """Clip, check for divergence, step. `summed_loss` is this update's loss summed over its `count`
        units; returns (that sum, the gradient norm before clipping, the metrics), as floats.
        `expect_gradient`: False for a loss whose gradient may rightly be zero for steps on end."""
        t, model, accelerator = self.config.training, self.model, self.accelerator
        if self.world > 1 and not self.sharded:
            distributed.average_gradients(model, self.world)
        if t.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        grad_norm = distributed.as_local(grad_norm).to(summed_loss.device)  # the whole norm, also under FSDP2
        stop = float(self.signals.received is not None)
        sums = torch.stack([summed_loss.double(), *(m.double() for m in metrics)])
        if self.world > 1:  # every process's share of the loss and metrics (and its stop signal); the norm is already global
            sums = accelerator.reduce(torch.cat([sums, sums.new_tensor([stop])]), "sum")
        # One device-to-host transfer per optimizer step, for the divergence check, the stop signal and the log.
        summed, norm, *values = torch.cat([sums[:1], grad_norm.double().reshape(1), sums[1:]]).tolist()
        if self.world > 1:
            self._stop_agreed = self._stop_agreed or values.pop() > 0
        loss = summed / max(count, 1)
        problem = self._divergence(loss, norm, expect_gradient)
        if problem:
            if self.bar is not None:
                self.bar.close()
            if self.log is not None:
                self.log.close()
            raise TrainingError(problem)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed, norm, values

    def _divergence(self, loss: float, norm: float, expect_gradient: bool) -> Optional[str]:
        """Why the run cannot go on: a non-finite loss or gradient, or (with stop_on_divergence) gradients
        that stayed exactly zero, or norms that stayed far above the run's first ones, for several steps."""
        step = self.state.global_step + 1
        # With fp16 loss scaling an inf gradient is routine: the scaler skips that step and
        # lowers the scale. Elsewhere a non-finite gradient means the run has diverged.
        scaled = self.accelerator.scaler is not None
        if not math.isfinite(loss) or (not scaled and not math.isfinite(norm)):
            return diverged_message(self.config, loss, step, self.checkpoints)
        if not self.config.training.stop_on_divergence or not math.isfinite(norm):
            return None
        state, patience = self.state, DIVERGENCE_PATIENCE
        if state.reference_grad_norm is None and norm > 0:
            self._first_norms.append(norm)
            if len(self._first_norms) == patience:
                state.reference_grad_norm = float(np.median(self._first_norms))
        zero = norm == 0.0 and expect_gradient
        exploding = state.reference_grad_norm is not None and norm > EXPLOSION * state.reference_grad_norm
        self._norms = [*self._norms, norm] if zero or exploding else []
        if len(self._norms) < patience:
            return None
        good = checkpoint.latest(self.checkpoints)
        kept = f"The last good checkpoint is {good}." if good else "No checkpoint was saved before it."
        lr = f"learning_rate {self.config.training.learning_rate:g} is likely too high"
        if zero:
            what = f"the gradients have been exactly zero for {patience} steps (loss {loss:.4f}): the model has collapsed"
        else:
            what = (f"the gradient norm has stayed above {EXPLOSION:g}x the run's first norms ({state.reference_grad_norm:.3g}) "
                    f"for {patience} steps (now {norm:.3g}): the run is diverging")
        return f"step {step}: {what}; {lr}. {kept} (stop_on_divergence: false lets it go on)"

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints ------------------------------------------------------------

    def _checkpoint_to_resume(self) -> Path:
        """The checkpoint a resume loads: the one named, or the newest whose files match their checksums.
        The ones skipped are named with the reason; none at all is one line that says how to start over."""
        restart = ("start over with --set overwrite_output_dir=true (without --resume), or choose another output_dir")
        if self.resume_from != "latest":
            path = Path(self.resume_from)
            why = checkpoint.damage(path) if path.is_dir() else "no such folder"
            if why:
                raise TrainingError(f"resume_from_checkpoint: {path} cannot be resumed: {why}")
            return path
        found = checkpoint.complete_checkpoints(self.checkpoints)
        for path in reversed(found):
            why = checkpoint.damage(path)
            if why is None:
                return path
            self.note(f"{path.name} skipped: {why}; resuming from an earlier checkpoint", "resume")
        if found:
            raise TrainingError(f"resume: no checkpoint in {self.checkpoints} is intact (each was skipped, see above); {restart}")
        raise TrainingError(f"resume: {self.dir} holds no checkpoint (the run stopped before its first one); {restart}")

    def resume_or_start(self) -> None:
        """Load the checkpoint to resume from (weights, optimizer, schedule, RNG, loop state), or start a fresh log.
        From here on SIGTERM and SIGINT finish the step in progress and save a checkpoint (see `end_of_step`)."""
        if self.resume_path is not None:
            path = self.resume_path
            try:
                saved = checkpoint.load(
                    path, self.accelerator.unwrap_model(self.model), self.optimizer, self.scheduler, scaler=self.accelerator.scaler
                )
            except UserError:
                raise
            except Exception as exc:  # it verified, so the files are as written: they were written by another model or version
                raise TrainingError(f"resume: {path} does not fit this run ({str(exc).splitlines()[0][:200]})") from None
            self.accelerator.wait_for_everyone()  # no process rewrites metrics.jsonl while another still reads the checkpoint
            self.state = type(self.state)(**saved)
            if self.main:  # what the interrupted run logged after this checkpoint is logged again now
                kept = [r for r in read_metrics(self.dir / "metrics.jsonl") if r["step"] <= self.state.global_step]
                (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.say(f"resumed from {path} at step {self.state.global_step}")
        elif self.main:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        self.log = MetricsLog(self.dir, self.config, enabled=self.main, resumed=self.resume_path is not None)
        for note in self.log.notes:
            self.note(note)
        self.signals.install()

    def end_of_step(self, total_steps: int) -> None:
        """After each optimizer step (each iteration, for the stages that roll out): when a stop signal came,
        save a checkpoint and stop with the line that says how to go on. Every process stops at the same step."""
        stop = self._stop_agreed if self.world > 1 else self.signals.received is not None
        if not stop:
            return
        name = self.signals.name or "a stop signal"
        step = self.state.global_step
        if self.bar is not None:
            self.bar.close()
        saved = self.save_checkpoint()
        if self.log is not None:
            self.log.close()
        self.close("stopped")
        raise Stopped(
            f"stopped by {name} at step {step} of {total_steps}; checkpoint saved: {saved}{CONTINUE}",
            self.signals.exit_code,
        )

    def close(self, outcome: Optional[str] = None) -> None:
        """The run's hold on its folder and signals; safe to call more than once (the first outcome stays)."""
        self.signals.uninstall()
        self.lock.release(outcome)

    def save_checkpoint(self) -> Path:
        self.accelerator.wait_for_everyone()
        path = self.checkpoints / f"{checkpoint.PREFIX}{self.state.global_step}"
        # Whole tensors, gathered by every process, in the one-process format: a run resumes with any process count.
        unwrapped = self.accelerator.unwrap_model(self.model)
        weights = distributed.full_trainable_state(unwrapped)
        optimizer_state = distributed.full_optimizer_state(unwrapped, self.optimizer)
        if self.main:
            path = checkpoint.save(
                self.checkpoints,
                self.state.global_step,
                weights,
                optimizer_state,
                self.scheduler,
                dict(self.state.__dict__),
                scaler=self.accelerator.scaler,
            )
            checkpoint.prune(self.checkpoints, self.config.output.save_total_limit, protect=getattr(self.state, "best_checkpoint", None))
        self.accelerator.wait_for_everyone()
        return path

    # -- the end ----------------------------------------------------------------

    def finish(self, save: Any, train_loss: Optional[float], eval_loss: Optional[float], counted: int,
               step_speed: Optional[float] = None) -> RunResult:
        """Write final/ (by `save(folder)` on the main process), close the log, draw the curve, write summary.json.
        `counted` is what the stage counts (trained tokens, pairs) over the whole run; `step_speed`, its rate
        inside the steps of this process's run."""
        final_dir = self.dir / "final"
        if self.bar is not None:
            self.bar.close()
        self.accelerator.wait_for_everyone()
        # A sharded model is gathered whole (every process joins) and written by the main process.
        state = distributed.full_model_state(self.model) if self.sharded else None
        self.signals.uninstall()  # the run is trained: a signal now ends it as the default does
        if self.main:
            try:  # written aside and renamed: never a half-written final/
                with staged_folder(final_dir) as staging:
                    save(staging, state)
            except Exception as exc:
                raise TrainingError(checkpoint.write_failure("final", final_dir, exc) + "; the checkpoints are kept") from None
        self.accelerator.wait_for_everyone()
        if self.log is not None:
            self.log.close(final_dir)
        if self.main and self.config.output.plot_loss:
            note = plot_loss(self.dir / "metrics.jsonl", self.dir / "plots" / "loss.png")
            if note:
                self.notes.append(note)
        seconds = time.perf_counter() - self.started
        result = RunResult(
            run_dir=self.dir,
            final_dir=final_dir,
            steps=self.state.global_step,
            train_loss=train_loss,
            eval_loss=eval_loss,
            best_checkpoint=getattr(self.state, "best_checkpoint", None),
            seconds=seconds,
            tokens_per_second=counted / max(seconds, 1e-9),
            startup=self.startup,
            step_speed=step_speed,
            notes=self.notes,
        )
        if self.main:
            (self.dir / "summary.json").write_text(
                json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()}, indent=2)
            )
        self.close("finished")
        return result


OPEN: list[Run] = []  # runs of this process not yet closed


@contextmanager
def closed_after() -> Iterator[None]:
    """Every run opened inside lets go of its folder lock and signal handlers at the end, however it ends
    (an error, or an exception from a callback), so that the same process can run or resume again."""
    before = len(OPEN)
    outcome = "failed"
    try:
        yield
        outcome = None  # each run closed itself with its outcome
    finally:
        for run in OPEN[before:]:
            run.close(outcome)
        del OPEN[before:]


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


def diverged_message(config: Config, loss: float, step: int, checkpoints: Path) -> str:
    good = checkpoint.latest(checkpoints)
    if config.precision.precision == "fp16":
        cause = "fp16 overflow is likely: use bf16, or lower learning_rate"
    else:
        cause = f"learning_rate {config.training.learning_rate:g} is likely too high, or a data row is broken"
    kept = f"The last good checkpoint is {good}." if good else "No checkpoint was saved before it."
    return f"loss became {loss} at step {step}: {cause}. {kept}"


def carry_trained_template(tokenizer: Any, config: Config) -> None:
    """The tokenizer's chat template becomes the format the run trained with, so that `apply_chat_template` on
    the saved tokenizer gives the ids training used (raw text training keeps the tokenizer's own)."""
    from ..data.template_jinja import named_jinja, trained_chat_template
    from ..data.templates import ALL_TEMPLATES

    from ..stages import stage_of

    if stage_of(config).reads <= {"text"}:
        return
    d = config.data
    trained = trained_chat_template(d.template, d.instruction_tuned, d.add_input_output_demarcation_key)
    if trained is None and not getattr(tokenizer, "chat_template", None):
        trained = named_jinja(ALL_TEMPLATES["plain"])  # what lmtune renders for a tokenizer without one
    if trained is not None:
        tokenizer.chat_template = trained


def save_final(model: Any, tokenizer: Any, config: Config, final_dir: Path, state: Optional[dict] = None) -> None:
    """Hugging Face / PEFT formats: a LoRA adapter, or a full model, with the tokenizer beside it.
    `state`: the whole weights of a sharded model, gathered."""
    final_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "num_labels", None) == 1 and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a reward model: transformers finds the last token by it
    model.save_pretrained(final_dir, safe_serialization=True, **({"state_dict": state} if state is not None else {}))
    carry_trained_template(tokenizer, config)
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
