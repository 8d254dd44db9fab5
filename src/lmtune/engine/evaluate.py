"""`lmtune eval`: the validation loss of a trained model, batched exactly as in training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config
from ..data.pipeline import prepare
from ..model.load import context_length, load_model, load_tokenizer
from ..model.methods import apply_method
from ..model.packed_attention import switch_to_packed
from ..config.method import trains_adapters
from ..stages import objective_for, stage_of
from . import checkpoint
from .loop import evaluate
from .run import TrainingError, make_accelerator


def load_trained(config: Config, where: Path) -> Any:
    """A model from a final/ folder (HF or PEFT format) or from a training checkpoint."""
    from ..generate import final_dir, load_for_inference

    if (where / "trainable.safetensors").exists():
        model = apply_method(load_model(config), config)
        checkpoint.load_weights(where, model)
        return model
    if (final_dir(where) / "lmtune.json").exists() or (where / "config.json").exists():
        return load_for_inference(where)[0]
    raise TrainingError(f"--checkpoint: {where} is neither a run, a final/ folder nor a checkpoint folder")


def evaluate_run(config: Config, config_dir: Optional[Path], checkpoint_path: str) -> dict[str, Any]:
    where = Path(checkpoint_path)
    if checkpoint_path == "latest":
        where = checkpoint.latest(Path(config.output.output_dir) / "checkpoints") or where
    if not where.exists():
        raise TrainingError(f"--checkpoint: {checkpoint_path}: no such folder")
    tokenizer = load_tokenizer(config)
    model = load_trained(config, where)
    data = prepare(config, tokenizer, context_length(model), config_dir)
    if not data.val:
        raise TrainingError("no validation data: set validation_split_ratio or validation_dataset to evaluate")
    accelerator = make_accelerator(config)
    model = accelerator.prepare(model)
    stage, objective = stage_of(config), objective_for(config)
    packing, _ = switch_to_packed(model, config.data.packing if stage.packs else False)
    batches = objective.batches(data.val, config, tokenizer, shuffle=False, for_eval=True, packing=packing)
    # A stage that compares against the starting policy gets it as in training: the adapter switched
    # off, or the base model loaded again.
    start = model if trains_adapters(config.finetuning.method) else load_model(config, head=stage.head)
    objective.prepare(start, [batches], OneProcess(accelerator), data.folder)
    metrics = evaluate(model, objective, batches, accelerator, stage.unit)
    return {"examples": len(data.val), **metrics}


class OneProcess:
    """The parts of a Run an objective's `prepare` reads, for an evaluation in this process."""

    main, sharded = True, False

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def place_frozen(self, module: Any) -> Any:
        return module.to(self.accelerator.device)
