"""A resume continues the run its folder holds, or refuses.

The checkpoint's weights, optimizer state, schedule and data order belong to the
settings the run started with (its config.resolved.yaml). A resume with another
model shape, data or schedule would train on something else than either config
says, so it is refused in one line naming each changed setting. Settings that
only change how the run is watched, saved or placed may change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config

# Groups whose settings only say how the run is logged, evaluated, saved and placed.
FREE_GROUPS = ("output", "evaluation", "distributed", "sagemaker")
# Settings of other groups that do not change the weights a step computes.
FREE_KEYS = {
    "preprocessing_num_workers", "overwrite_cache", "cache_dir",  # the same tokens, made again or elsewhere
    "gradient_checkpointing", "torch_compile", "attn_implementation", "tf32",  # the same mathematics, other speed
    "trust_remote_code", "allow_pickle_weights",  # how the same files are loaded
}
SCHEDULE_KEYS = {
    "learning_rate", "max_steps", "epochs", "warmup_steps", "warmup_ratio", "lr_scheduler", "lr_cycles", "lr_power",
    "min_lr_ratio",
}


def changed_settings(config: Config, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Setting -> (the run's value, the new value), for the settings a resume cannot change."""
    import yaml

    now = yaml.safe_load(yaml.safe_dump(config.flat(), sort_keys=False))  # the types the saved file holds
    free = FREE_KEYS | {key for group in FREE_GROUPS for key in type(getattr(config, group)).model_fields}
    return {
        key: (saved[key], value)
        for key, value in now.items()
        if key in saved and key not in free and saved[key] != value
    }


def resume_problem(config: Config, resolved: Path, checkpoint: Path) -> Optional[str]:
    """One line naming each setting that differs from the run's own, or None when the resume may go on."""
    import yaml

    try:
        saved = yaml.safe_load(resolved.read_text())
    except (OSError, yaml.YAMLError):
        return None  # no record of the run's settings (an older run): its checkpoint is checked when it loads
    if not isinstance(saved, dict):
        return None
    changed = changed_settings(config, saved)
    if not changed:
        return None
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    data = set(type(config.data).model_fields)
    kinds = {"schedule" if key in SCHEDULE_KEYS else "data" if key in data else "model and method" for key in changed}
    what = " and ".join(kind for kind in ("model and method", "data", "schedule") if kind in kinds)
    return (
        f"resume: {checkpoint} does not match this config's {what}: these settings differ from the run's own "
        f"({resolved.name}): {listed}. Resume with the run's settings, or start a new run in another output_dir"
    )
