"""The `lmtune` command.

Each subcommand imports what it needs when it runs, so `check` and `explain`
never load torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def _print_problems(problems, stream=None) -> None:
    stream = stream or sys.stdout
    order = {"error": 0, "warning": 1, "note": 2}
    for problem in sorted(problems, key=lambda p: order[p.level]):
        print(str(problem), file=stream)


@command("check")
def run_check(args: argparse.Namespace) -> int:
    from .config.load import missing_essentials, resolve
    from .config.schema import KEY_GROUP, Config

    resolved = resolve(args.config, args.set)
    if resolved.config is not None:  # check passes only what train could start
        resolved.problems += missing_essentials(resolved.config)
    data_line, rows = None, None
    if resolved.config is not None and not resolved.errors and resolved.config.data.dataset:
        data_line, problem, rows = _check_records(resolved.config, Path(args.config).resolve().parent)
        resolved.problems += [problem] if problem else []
    ok = not resolved.errors
    if args.json:
        report = {
            "ok": ok,
            "config": resolved.config.flat() if resolved.config else None,
            "sources": {k: str(s) for k, s in resolved.sources.items() if s.origin != "default"},
            "problems": [{"level": p.level, "key": p.key, "message": p.message} for p in resolved.problems],
        }
        print(json.dumps(report, indent=2, default=str))
        return 0 if ok else 1
    if resolved.config is not None:
        flat = resolved.config.flat()
        defaults = Config().flat()
        shown = [k for k in KEY_GROUP if args.all or resolved.was_set(k) or flat[k] != defaults[k]]
        width = max((len(k) for k in shown), default=10)
        print(f"{args.config}: resolved settings")
        group = None
        for key in shown:
            if KEY_GROUP[key] != group:
                group = KEY_GROUP[key]
                print(f"  [{group}]")
            value = json.dumps(flat[key], default=str)
            print(f"    {key:<{width}}  {value:<24}  {resolved.sources[key]}")
        hidden = len(KEY_GROUP) - len(shown)
        if hidden:
            print(f"  ({hidden} more settings at their defaults; --all shows them)")
    if data_line:
        print(data_line)
    if ok:
        plan_line = _plan_verdict(resolved.config, rows)
        if plan_line:
            print(plan_line)
    _print_problems(resolved.problems)
    counts = {level: sum(p.level == level for p in resolved.problems) for level in ("error", "warning", "note")}
    summary = ", ".join(f"{n} {level}{'s' if n != 1 else ''}" for level, n in counts.items())
    print(("OK: " if ok else "FAILED: ") + summary)
    return 0 if ok else 1


def _check_records(config, config_dir: Path):
    """(a summary line, a problem) from reading local data rows as training will; no tokenizer, no torch."""
    from .config.problem import Problem
    from .data.records import DataError
    from .data.pipeline import check_local_records

    try:
        summary = check_local_records(config, config_dir)
    except DataError as exc:
        return None, Problem("error", "dataset", str(exc)), None
    if summary is None:
        how = "streamed datasets are" if config.data.streaming else "hub or saved datasets are"
        return f"data: {how} read at `lmtune data` / `train`, not here", None, None
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary.formats.items())
    line = f"data: {summary.rows_read} rows read ({kinds}), {summary.train_rows} for training, {summary.val_rows} held out"
    return line, None, summary.train_rows


def _plan_verdict(config, rows: int | None) -> str | None:
    """`lmtune plan`'s one line, when the model's config.json is here (builtin or a local folder: no download);
    `rows`: the training rows `check` has just read, for the run's length."""
    from .plan import PlanError, cpu_memory_gib, default_device, default_devices, make_plan, verdict

    base = config.model.base_model
    if not base or not (base.startswith("builtin:") or Path(base).expanduser().is_dir()):
        return None
    device = default_device()
    try:
        plan = make_plan(config, device, default_devices(), cpu_memory_gib() if device == "cpu" else None, rows=rows)
    except PlanError:
        return None
    return f"plan: {verdict(plan)} (lmtune plan shows how)"


def _local_rows(config, config_dir: Path) -> int | None:
    from .data.pipeline import check_local_records
    from .data.records import DataError

    try:
        summary = check_local_records(config, config_dir) if config.data.dataset else None
    except DataError:
        return None
    return summary.train_rows if summary else None


@command("plan")
def run_plan(args: argparse.Namespace) -> int:
    from .config.load import resolve
    from .plan import as_json, cpu_memory_gib, default_device, default_devices, make_plan, parse_memory, table

    resolved = resolve(args.config, args.set)
    # What this machine lacks (bitsandbytes, a tracker) does not stop sizing the run for another one.
    errors = [p for p in resolved.errors if not p.machine]
    if resolved.config is None or errors:
        _print_problems(errors or resolved.errors, sys.stderr)
        return 1
    for problem in resolved.errors:
        print(f"note: {problem.key}: {problem.message} (on this machine; plan reads config.json only)", file=sys.stderr)
    if not resolved.config.model.base_model:
        print("error: base_model: no model given; plan reads its config.json", file=sys.stderr)
        return 1
    device = args.gpu or default_device()
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else (cpu_memory_gib() if device == "cpu" else None)
    rows = _local_rows(resolved.config, Path(args.config).resolve().parent)
    plan = make_plan(resolved.config, device, args.gpus or default_devices(), memory, rows=rows)
    print(as_json(plan) if args.json else table(plan))
    return 0


@command("convert")
def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert, migrating_markdown, read_source, summary, to_yaml

    if args.markdown:
        print(migrating_markdown(), end="")
        return 0
    if args.file is None:
        print("error: convert: give the config file to convert", file=sys.stderr)
        return 1
    source = Path(args.file)
    conversion = convert(read_source(source), args.source, Path(args.dataset_info) if args.dataset_info else None,
                         source.resolve().parent)
    text = to_yaml(conversion, source.name)
    if args.out:
        Path(args.out).write_text(text)
        print(summary(conversion))
        print(f"wrote {args.out}; `lmtune check {args.out}` validates it")
    else:
        print(text, end="")
        print(summary(conversion), file=sys.stderr)
    return 0


def _looks_like_file(text: str) -> bool:
    return Path(text).is_file() or text.endswith((".yaml", ".yml", ".json"))


@command("explain")
def run_explain(args: argparse.Namespace) -> int:
    from .config import docs

    if args.markdown:
        sys.stdout.write(docs.configuration_markdown())
        return 0
    if args.target is None:
        from .config.schema import GROUPS

        for group, cls in GROUPS.items():
            print(f"[{docs.GROUP_TITLES[group]}]")
            for key, info in cls.model_fields.items():
                print(f"  {key:<34} {info.description.split('. ')[0].rstrip('.')}")
        print("\n`lmtune explain KEY` tells more about one; `lmtune explain CONFIG` comments on a config.")
        return 0
    if _looks_like_file(args.target):
        from .config.load import resolve

        from .config.load import missing_essentials

        resolved = resolve(args.target, args.set)
        if resolved.config is None:
            _print_problems(resolved.errors, sys.stderr)
            return 1
        rows = docs.explain_config(resolved.config)
        if not rows:
            print("Every setting is at its default.")
        for key, value, text in rows:
            shown = json.dumps(value, default=str)
            print(f"{key}: {shown}\n    {text}.")
        # The meaning of each value is shown even when some are wrong; the mistakes come after, and fail.
        errors = resolved.errors + missing_essentials(resolved.config)
        _print_problems(errors, sys.stderr)
        return 1 if errors else 0
    try:
        print(docs.explain_key(args.target))
        from .config.aliases import UNSUPPORTED

        if args.target in UNSUPPORTED:
            return 1  # explained, but a config with it fails `check`: scripts asking `explain` learn that too
    except KeyError:
        from .config.load import _suggest

        print(f"error: {args.target}: no such setting; {_suggest(args.target)}", file=sys.stderr)
        return 1
    return 0


def _valid_config(args: argparse.Namespace):
    """The config, with warnings shown; on errors, print them all and stop the command."""
    from .config.load import ConfigError, missing_essentials, resolve

    resolved = resolve(args.config, args.set)
    if resolved.config is not None:
        resolved.problems += missing_essentials(resolved.config)
    if resolved.errors or resolved.config is None:
        _print_problems(resolved.errors, sys.stderr)
        raise ConfigError([]) from None
    for problem in resolved.problems:
        if problem.level == "warning":
            print(str(problem), file=sys.stderr)
    return resolved.config


@command("train")
def run_train(args: argparse.Namespace) -> int:
    config = _valid_config(args)
    from .launch import launch, launched

    if (args.nproc > 1 or args.nnodes > 1) and not launched():
        command = ["-m", "lmtune", "train", args.config, *(f"--set={item}" for item in args.set or [])]
        command += [f"--resume={args.resume}"] if args.resume else []
        return launch(command, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if args.own_process:
        from .model.unused_imports import skip_bitsandbytes_unless_needed

        skip_bitsandbytes_unless_needed(config)
    from .engine.loop import train

    from .engine.preemption import CONTINUE, Stopped

    try:
        result = train(config, Path(args.config).resolve().parent, resume=args.resume)
    except Stopped as exc:
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        spread = [f"--nproc {local}"] if world > 1 else []
        spread += [f"--nnodes {world // local}"] if world > local else []
        again = " ".join(["lmtune train", args.config, *(f"--set {item}" for item in args.set or []), *spread, "--resume"])
        raise Stopped(f"{str(exc).removesuffix(CONTINUE)}; continue with: {again}", exc.exit_code) from None
    if launched():
        from .engine.distributed import leave_process_group

        leave_process_group()
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process reports for all
    from .stages import stage_of

    unit = {"tokens": "trained tokens"}.get(stage_of(config).unit, stage_of(config).unit)
    inside = f"; {result.step_speed:.0f}/s in the steps, as the bar shows" if result.step_speed else ""
    print(f"done: {result.steps} steps in {result.seconds:.1f}s ({result.tokens_per_second:.0f} {unit}/s from start to end{inside})")
    if result.train_loss is not None:
        print(f"  last train loss {result.train_loss:.4f}" + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    if result.best_checkpoint:
        print(f"  best checkpoint: {result.best_checkpoint}")
    print(f"  model: {result.final_dir}")
    plot = result.run_dir / "plots" / "loss.png"
    if plot.exists():
        print(f"  loss curve: {plot}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


@command("data")
def run_data(args: argparse.Namespace) -> int:
    config = _valid_config(args)
    from .data.inspect import show_data

    show_data(config, Path(args.config).resolve().parent, args.show)
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    from .model.load import quiet_library_warnings

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    quiet_library_warnings()


def _skip_bitsandbytes_for_inference(args: argparse.Namespace) -> None:
    if args.own_process:  # inference puts adapters over the full-precision base: no bitsandbytes
        from .model.unused_imports import skip_bitsandbytes

        skip_bitsandbytes()


@command("chat")
def run_chat(args: argparse.Namespace) -> int:
    if not Path(args.run).exists():
        print(f"error: {args.run}: no such run folder", file=sys.stderr)
        return 1
    _skip_bitsandbytes_for_inference(args)
    from .generate import answer, generation_settings, load_for_inference

    _quiet_transformers()
    model, tokenizer, meta = load_for_inference(args.run)
    # The run's own generation settings, unless the command line says otherwise.
    options = generation_settings(args.run)
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        options.update(do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    options["demarcation"] = meta.get("add_input_output_demarcation_key", False)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        prompt = with_escapes(args.prompt)  # `--prompt 'Reverse the list.\n\n1 2 3'`, as a shell passes it
        print(answer(model, tokenizer, [system + [{"role": "user", "content": prompt}]], meta.get("template"), **options)[0])
        return 0
    history = list(system)
    print("Type a message and press Enter; end a line with \\ to go on to the next line of the same message. "
          "Ctrl-D (or /exit) ends the chat.")
    while True:
        lines: list[str] = []
        try:
            while True:
                line = input("you> " if not lines else "...> ")
                if not line.endswith("\\"):
                    lines.append(line)
                    break
                lines.append(line[:-1])
        except EOFError:
            break
        text = "\n".join(lines)
        if text.strip() == "/exit":
            break
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = answer(model, tokenizer, [history], meta.get("template"), **options)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


@command("eval")
def run_eval_command(args: argparse.Namespace) -> int:
    config = _valid_config(args)
    if args.own_process:
        from .model.unused_imports import skip_bitsandbytes_unless_needed

        skip_bitsandbytes_unless_needed(config)  # a quantised base needs it; anything else would only hear from it
    _quiet_transformers()
    from .engine.evaluate import evaluate_run

    metrics = evaluate_run(config, Path(args.config).resolve().parent, args.checkpoint)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


@command("score")
def run_score(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.text, args.prompt, args.file)) != 1:
        print("error: score: give one of --text, --prompt (with --answer) or --file", file=sys.stderr)
        return 1
    if args.prompt is not None and args.answer is None:
        print("error: score: --prompt needs --answer (the answer whose reward you want)", file=sys.stderr)
        return 1
    if args.file is not None and not Path(args.file).is_file():
        print(f"error: score: {args.file}: no such file", file=sys.stderr)
        return 1
    if not Path(args.run).exists():
        print(f"error: {args.run}: no such run folder", file=sys.stderr)
        return 1
    _skip_bitsandbytes_for_inference(args)
    from .score import load_reward_model, score_file, score_text

    _quiet_transformers()
    model, tokenizer, meta = load_reward_model(args.run)
    if args.file is not None:
        for result in score_file(model, tokenizer, meta, Path(args.file)):
            print(json.dumps(result))
        return 0
    print(f"{score_text(model, tokenizer, meta, args.text, args.prompt, args.answer):.6f}")
    return 0


@command("export")
def run_export(args: argparse.Namespace) -> int:
    _skip_bitsandbytes_for_inference(args)
    _quiet_transformers()
    from .generate import final_dir, load_for_inference

    folder = final_dir(args.run)
    if not (folder / "lmtune.json").exists():
        print(f"error: {args.run}: not an lmtune run (no final/lmtune.json)", file=sys.stderr)
        return 1
    adapter = (folder / "adapter_config.json").exists()
    if adapter and not args.merge:
        print("error: this run holds a LoRA adapter; pass --merge to write a standalone model", file=sys.stderr)
        return 1
    import torch

    if json.loads((folder / "lmtune.json").read_text()).get("stage") == "rm":  # a reward model keeps its scalar head
        from .score import load_reward_model

        model, tokenizer, _ = load_reward_model(args.run)
        model = model.merge_and_unload() if adapter else model
        model.config.pad_token_id = tokenizer.pad_token_id  # transformers finds each sequence's last token by it
        what = "reward model (AutoModelForSequenceClassification, one output)"
    else:
        model, tokenizer, _ = load_for_inference(args.run, merge=adapter)
        what = "model"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = model.to(dtype)
    out = Path(args.out or Path(args.run) / "merged")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "lmtune.json").write_text((folder / "lmtune.json").read_text())
    print(f"wrote a standalone {args.dtype} {what} to {out}")
    return 0


@command("board")
def run_board(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: board: needs {' and '.join(missing)}; pip install 'lmtune[board]'", file=sys.stderr)
        return 1
    root = Path(args.runs_dir)
    if not root.is_dir():
        print(f"error: {root}: no such folder; give the folder that holds your run folders (e.g. runs)", file=sys.stderr)
        return 1
    from .board.server import serve

    return serve(root, args.host, args.port, args.token)


@command("quickstart")
def run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run

    _quiet_transformers()
    return run(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtune",
        description="Fine-tune causal language models from one YAML file.",
    )
    parser.add_argument("--version", action="version", version=f"lmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _config_commands(sub)
    _training_commands(sub)
    _model_commands(sub)
    return parser


def with_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")


def _config_commands(sub: Any) -> None:
    """check, plan, convert, explain: reading configs, nothing heavy."""
    p = sub.add_parser("check", help="validate a config without loading anything heavy")
    p.add_argument("config", help="YAML or JSON config (SageMaker hyperparameters.json works too)")
    with_overrides(p)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--all", action="store_true", help="also list settings left at their defaults")

    p = sub.add_parser("plan", help="memory per device and time to finish, from the model's config.json alone")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--gpus", type=int, default=None, help="devices (processes); default 1, or SM_NUM_GPUS")
    from .plan import DEVICES  # names only: plan reads no torch

    p.add_argument("--gpu", choices=list(DEVICES), default=None, help="the device kind; default: the visible GPU, else cpu")
    p.add_argument("--gpu-memory", help="memory per device, like 80GiB (default: the kind's)")
    p.add_argument("--json", action="store_true", help="the numbers, machine-readable")

    p = sub.add_parser("convert", help="an Axolotl, LLaMA-Factory, torchtune or JumpStart config as an lmtune config")
    p.add_argument("file", nargs="?")
    p.add_argument("--markdown", action="store_true", help="print the key tables of every tool (docs/migrating.md)")
    p.add_argument("--from", dest="source", choices=["axolotl", "llamafactory", "torchtune", "jumpstart"], default=None,
                   help="the tool that wrote it (default: detected)")
    p.add_argument("-o", "--out", help="write the lmtune config here (default: print it)")
    p.add_argument("--dataset-info", help="LLaMA-Factory's dataset_info.json, to resolve dataset names")

    p = sub.add_parser("explain", help="what a setting does, or what a config's values mean")
    p.add_argument("target", nargs="?", help="a setting name (any tool's) or a config file")
    with_overrides(p)
    p.add_argument("--markdown", action="store_true", help="print the full reference as Markdown")


def _training_commands(sub: Any) -> None:
    """train, data, eval: a config's run and its data."""
    p = sub.add_parser("train", help="fine-tune a model as the config says")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in output_dir from its latest checkpoint, or from CHECKPOINT")
    launch = p.add_argument_group("several processes (data parallel, or FSDP with enable_fsdp)")
    launch.add_argument("--nproc", type=int, default=1, metavar="N", help="processes on this host (one per GPU; on CPU, gloo)")
    launch.add_argument("--nnodes", type=int, default=1, metavar="N", help="hosts taking part (run the same command on each)")
    launch.add_argument("--node-rank", type=int, default=0, metavar="I", help="this host's number, 0 to nnodes-1")
    launch.add_argument("--master-addr", default=None, metavar="HOST", help="host 0's address (default MASTER_ADDR, or this host)")
    launch.add_argument("--master-port", type=int, default=None, metavar="PORT", help="default MASTER_PORT, or 29500 across hosts")

    p = sub.add_parser("data", help="what the data step makes of your files, without training")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered examples, trained tokens highlighted")

    p = sub.add_parser("eval", help="eval loss and perplexity of a trained model on the config's validation data")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--checkpoint", required=True, help="a run folder, its final/ folder, or a checkpoint folder")

    p = sub.add_parser("sagemaker", help="a SageMaker training job's entry point (reads /opt/ml or $SAGEMAKER_BASE_DIR)",
                       description="Train as a SageMaker training job: hyperparameters from hyperparameters.json, SM_HPS "
                       "and --name value flags; data from the train/validation channels; the base model from the model "
                       "channel or base_model. See docs/sagemaker.md.")
    p.add_argument("hyperparameters", nargs="*", help="--name value pairs, as the SageMaker toolkit passes them")

    p = sub.add_parser("quickstart", help="an offline fine-tuning run from start to end, in a few minutes")
    p.add_argument("--out", default="runs/quickstart", help="where the data, config and run go")

    p = sub.add_parser("board", help="a local web page where runs are watched, compared and launched (the board extra)")
    p.add_argument("runs_dir", nargs="?", default="runs", help="the folder that holds the run folders (nested ones too)")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on; any but this machine's own needs a token")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--token", help="the token every request must carry (generated and printed when serving beyond 127.0.0.1)")


def _model_commands(sub: Any) -> None:
    """chat, score, export: a trained run's model."""
    p = sub.add_parser("chat", help="talk to a trained run, with the template it was trained with")
    p.add_argument("run", help="a run folder (output_dir) or its final/ folder")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's max_new_tokens")
    p.add_argument("--temperature", type=float, default=None, help="0 answers greedily; default: the run's settings")

    p = sub.add_parser("score", help="rewards from a trained reward model (an rm run)")
    p.add_argument("run", help="an rm run folder (output_dir) or its final/ folder")
    p.add_argument("--text", help="score this text as it is")
    p.add_argument("--prompt", help="score --answer to this prompt, rendered with the run's template")
    p.add_argument("--answer")
    p.add_argument("--file", help="JSON lines: {text} or {prompt, answer} or {prompt, chosen, rejected}; one JSON result per line")

    p = sub.add_parser("export", help="merge a LoRA adapter into its base and save a standalone model")
    p.add_argument("run")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--out", help="where to write (default: RUN/merged)")


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """`own_process`: this process runs this one command, so process-wide choices
    (which optional libraries to load) are safe to make."""
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["sagemaker"] and given[1:2] not in (["-h"], ["--help"]):
        from .sagemaker import main as sagemaker_main  # its flags are the job's hyperparameters, not ours

        return sagemaker_main(given[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = own_process
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import UserError

    from .launch import FAILURES, keep_output, launched, lost_contact, record_failure

    if launched() and own_process:  # the process is this command's: its output streams may be wrapped
        keep_output()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        close_progress_bars()  # the error starts a line of its own, not the end of a bar's
        if not (launched() and os.environ.get(FAILURES)):  # under lmtune's own launcher, it prints the line once for all
            print(f"error: {exc}", file=sys.stderr)
        record_failure(str(exc))
        return getattr(exc, "exit_code", 1)
    except Exception as exc:  # a bug: the traceback stays; a launch still names the process that failed
        if launched() and lost_contact(exc):  # another process died or hung: the launcher names it
            close_progress_bars()
            line = f"lost contact with the other processes ({str(exc).splitlines()[0][:160]})"
            if not os.environ.get(FAILURES):  # under torchrun nobody else says it; under ours the launcher names the cause
                print(f"error: {line}", file=sys.stderr)
            record_failure(f"timed out: {line}" if "imeout" in str(exc) or "imed out" in str(exc) else line)
            return 1
        if launched():
            record_failure(f"internal error ({type(exc).__name__}): {exc}")
        raise


def with_escapes(text: str) -> str:
    """\\n and \\t typed on a command line as the newline and tab they stand for (other characters untouched)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def entry() -> int:
    """The `lmtune` program."""
    try:
        return main(own_process=True)
    except BrokenPipeError:  # `lmtune explain | head`: the reader stopped reading; nothing is wrong
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C before a run's first step (from there on a run stops with a checkpoint)
        close_progress_bars()
        print("\ninterrupted: nothing was trained yet, so nothing is saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(entry())
