"""A SageMaker training job's entry point: `lmtune sagemaker [--key value ...]`, or `python -m lmtune.sagemaker`.

A training container hands its job over through one folder tree (/opt/ml, or
$SAGEMAKER_BASE_DIR) and SM_* variables (docs/sagemaker.md has the contract).
This module reads them into an lmtune config, trains, and leaves what SageMaker
uploads: the final model in the model directory, metrics and plots in the
output data directory, and on failure a one-line reason in output/failure with
a non-zero exit. The run folder is the checkpoint directory, so a restarted job
that finds checkpoints there resumes from the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import UserError


class JobError(UserError, ValueError):
    """A job SageMaker set up in a way lmtune cannot train from (no train channel, a bad hyperparameter, no model)."""


@dataclass
class Job:
    """Where a SageMaker job's inputs and outputs live, from the environment the container sets."""

    base: Path
    hyperparameters_file: Path
    train: Optional[Path]
    validation: Optional[Path]
    model_channel: Optional[Path]
    model_dir: Path
    output_data_dir: Path
    output_dir: Path
    checkpoints: Path
    hosts: list[str]
    current_host: str
    gpus: int

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> "Job":
        base = Path(env.get("SAGEMAKER_BASE_DIR", "/opt/ml"))

        def channel(name: str) -> Optional[Path]:
            given = env.get(f"SM_CHANNEL_{name.upper()}")
            folder = Path(given) if given else base / "input" / "data" / name
            return folder if folder.is_dir() else None

        resources = base / "input" / "config" / "resourceconfig.json"
        resource = json.loads(resources.read_text()) if resources.exists() else {}
        hosts = json.loads(env["SM_HOSTS"]) if env.get("SM_HOSTS") else resource.get("hosts", ["localhost"])
        return cls(
            base=base,
            hyperparameters_file=base / "input" / "config" / "hyperparameters.json",
            train=channel("train"),
            validation=channel("validation"),
            model_channel=channel("model"),
            model_dir=Path(env.get("SM_MODEL_DIR", base / "model")),
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
            output_dir=Path(env.get("SM_OUTPUT_DIR", base / "output")),
            checkpoints=base / "checkpoints",
            hosts=sorted(hosts),
            current_host=env.get("SM_CURRENT_HOST", resource.get("current_host", "localhost")),
            gpus=int(env.get("SM_NUM_GPUS", "0") or 0),
        )


def parse_flags(argv: list[str]) -> dict[str, str]:
    """`--key value` and `--key=value` pairs, as the SageMaker toolkit passes hyperparameters to a script."""
    out: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or len(token) == 2:
            raise JobError(f"hyperparameter flags: {token!r} is not a --name; flags come as --name value")
        name = token[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            index += 1
            value = argv[index]
        else:
            value = "True"  # a bare switch
        out[name.replace("-", "_")] = value
        index += 1
    return out


def hyperparameters(job: Job, argv: list[str], env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """hyperparameters.json, then SM_HPS, then the command-line flags: later ones win."""
    values: dict[str, Any] = {}
    sources = []
    if job.hyperparameters_file.exists():
        sources.append(("hyperparameters.json", job.hyperparameters_file.read_text()))
    if env.get("SM_HPS"):
        sources.append(("SM_HPS", env["SM_HPS"]))
    for name, text in sources:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JobError(f"{name}: not JSON ({exc.msg} at line {exc.lineno}); it must be one object of name: value") from None
        if not isinstance(parsed, dict):
            raise JobError(f"{name}: not a JSON object of name: value")
        values.update(parsed)
    values.update(parse_flags(argv))
    return values


def find_base_model(folder: Path) -> Path:
    """The model channel's weights: config.json at its top, or in its one subfolder (an extracted archive)."""
    if (folder / "config.json").exists():
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir() and (p / "config.json").exists()]
    if len(inner) == 1:
        return inner[0]
    raise JobError(f"base model: no config.json in the model channel {folder} (nor in one folder inside it); "
                   "put a Hugging Face model folder there, or set the base_model hyperparameter")


def job_settings(job: Job, values: dict[str, Any], say: Any = print) -> tuple[dict[str, Any], Optional[str]]:
    """(the config's settings, what to resume from): the hyperparameters with the job's channels and folders."""
    settings = dict(values)
    if job.train is not None:
        settings["dataset"] = str(job.train)
    elif not settings.get("dataset"):
        raise JobError("no train channel: the job has no SM_CHANNEL_TRAIN (input/data/train) and no dataset hyperparameter; "
                       "give the training job a 'train' input channel")
    if job.validation is not None:
        settings["validation_dataset"] = str(job.validation)
    if not settings.get("base_model") or str(settings["base_model"]).strip('"') in ("None", ""):
        if job.model_channel is None:
            raise JobError("base model: the job has no model channel (SM_CHANNEL_MODEL) and no base_model hyperparameter; "
                           "add a 'model' input channel with the weights, or set base_model")
        settings["base_model"] = str(find_base_model(job.model_channel))
    if settings.get("output_dir"):
        say(f"note: output_dir: {settings['output_dir']} is replaced by the job's checkpoint folder {job.checkpoints}")
    settings["output_dir"] = str(job.checkpoints)
    reports = settings.get("report_to") or ["jsonl"]
    reports = [reports] if isinstance(reports, str) else list(reports)
    settings["report_to"] = [*reports, "stdout"] if "stdout" not in reports else reports
    from .engine import checkpoint

    found = checkpoint.latest(job.checkpoints / "checkpoints")
    if found is not None:
        say(f"found checkpoints in {job.checkpoints}: resuming from {found.name}")
        return settings, "latest"
    settings["overwrite_output_dir"] = True  # what a job stopped before its first checkpoint left is started over
    return settings, None


def publish(result: Any, config: Any, job: Job, say: Any = print) -> None:
    """The final model into the model directory (merged, or the adapter), the run's records into the output data directory."""
    final = Path(result.final_dir)
    job.model_dir.mkdir(parents=True, exist_ok=True)
    adapter = (final / "adapter_config.json").exists()
    if adapter and config.sagemaker.merge_adapter:
        import torch

        from .generate import load_for_inference

        model, tokenizer, _ = load_for_inference(final, merge=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision.precision, torch.float32)
        model.to(dtype).save_pretrained(job.model_dir, safe_serialization=True)
        tokenizer.save_pretrained(job.model_dir)
        shutil.copy2(final / "lmtune.json", job.model_dir / "lmtune.json")
        say(f"model: the LoRA adapter merged into its base ({config.precision.precision}) in {job.model_dir}")
    else:
        shutil.copytree(final, job.model_dir, dirs_exist_ok=True)
        say(f"model: the {'LoRA adapter (PEFT format)' if adapter else 'full model'} in {job.model_dir}")
    job.output_data_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(result.run_dir)
    for name in ("metrics.jsonl", "summary.json", "config.resolved.yaml"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, job.output_data_dir / name)
    if (run_dir / "plots").is_dir():
        shutil.copytree(run_dir / "plots", job.output_data_dir / "plots", dirs_exist_ok=True)


def fail(job: Optional[Job], reason: str) -> int:
    """The one-line reason where SageMaker shows it (output/failure) and on stderr; exit status 1.
    A launched process leaves its reason to the launcher, which writes the failure file once."""
    from .launch import launched, record_failure

    line = " ".join(reason.split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    if launched():
        record_failure(line)
    elif job is not None:
        try:
            job.output_dir.mkdir(parents=True, exist_ok=True)
            (job.output_dir / "failure").write_text(line + "\n")
        except OSError as exc:  # outside a container (no writable /opt/ml): stderr carries the reason alone
            print(f"note: could not write {job.output_dir / 'failure'} ({exc.strerror}); set SAGEMAKER_BASE_DIR outside a "
                  "SageMaker container", file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job: Optional[Job] = None
    try:
        job = Job.from_environment()
        from .launch import launch, launched

        processes = max(job.gpus, 1)
        if (processes > 1 or len(job.hosts) > 1) and not launched():
            # One process per GPU on every host; host 0 (in sorted order) is where they meet.
            if job.current_host not in job.hosts:
                raise JobError(f"SM_CURRENT_HOST {job.current_host} is not among SM_HOSTS {job.hosts}")
            print(f"launching {processes} process(es) on each of {len(job.hosts)} host(s); this is host {job.current_host}", flush=True)
            return launch(["-m", "lmtune.sagemaker", *argv], processes, len(job.hosts), job.hosts.index(job.current_host),
                          master_addr=job.hosts[0], master_port=29500)
        values = hyperparameters(job, argv)
        settings, resume = job_settings(job, values)
        from .config.load import ConfigError, resolve

        resolved = resolve(data=settings)
        if resolved.errors or resolved.config is None:
            raise ConfigError(resolved.errors)
        config = resolved.config
        from .model.unused_imports import skip_bitsandbytes_unless_needed

        skip_bitsandbytes_unless_needed(config)
        from .engine.loop import train

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # CloudWatch keeps every redraw; metrics arrive as name=value lines
        result = train(config, None, resume=resume)
        if launched():
            from .engine.distributed import leave_process_group

            leave_process_group()
        if os.environ.get("RANK", "0") != "0":
            return 0  # the main process publishes the model and the records
        publish(result, config, job)
        print(f"done: {result.steps} steps in {result.seconds:.1f}s", flush=True)
        return 0
    except UserError as exc:
        code = fail(job, str(exc))
        return getattr(exc, "exit_code", code)  # a job stopped by SIGTERM (spot) exits 143 with its checkpoint saved
    except Exception as exc:  # a bug in lmtune: SageMaker still gets a reason, and the log gets the traceback
        import traceback

        traceback.print_exc()
        return fail(job, f"internal error ({type(exc).__name__}): {exc}; please report it")


if __name__ == "__main__":
    sys.exit(main())
