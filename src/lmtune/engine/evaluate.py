"""`lmtune eval`: the validation loss of a trained model, batched exactly as in training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config
from ..data.pipeline import prepare
from ..model.load import context_length, load_model, load_tokenizer
from ..model.methods import apply_method
from ..model.packed_attention import switch_to_packed
from ..stages import stage_for
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
    stage = stage_for(config)
    packing, _ = switch_to_packed(model, config.data.packing if stage.packs else False)
    batches = stage.batches(data.val, config, tokenizer, shuffle=False, for_eval=True, packing=packing)
    metrics = evaluate(model, stage, batches, accelerator)
    return {"examples": len(data.val), **metrics}
