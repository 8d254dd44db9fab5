"""The `lmtune` command.

Each subcommand imports what it needs when it runs, so `check` and `explain`
never load torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

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
    from .config.load import resolve
    from .config.schema import KEY_GROUP, Config

    resolved = resolve(args.config, args.set)
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
    _print_problems(resolved.problems)
    counts = {level: sum(p.level == level for p in resolved.problems) for level in ("error", "warning", "note")}
    summary = ", ".join(f"{n} {level}{'s' if n != 1 else ''}" for level, n in counts.items())
    print(("OK: " if ok else "FAILED: ") + summary)
    return 0 if ok else 1


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
        return 0
    try:
        print(docs.explain_key(args.target))
    except KeyError:
        from .config.load import _suggest

        print(f"error: {args.target}: no such setting; {_suggest(args.target)}", file=sys.stderr)
        return 1
    return 0


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean a mistake in the config, data or model choice: one line, no traceback."""
    from .config.load import ConfigError
    from .data.records import DataError
    from .engine.loop import TrainingError
    from .model.load import ModelError
    from .stages import StageNotAvailable

    return (ConfigError, DataError, ModelError, TrainingError, StageNotAvailable)


def _valid_config(args: argparse.Namespace):
    from .config.load import resolve

    resolved = resolve(args.config, args.set)
    if resolved.errors or resolved.config is None:
        _print_problems(resolved.errors, sys.stderr)
        print(f"FAILED: fix the errors above (lmtune check {args.config} lists everything)", file=sys.stderr)
        return None
    for problem in resolved.problems:
        if problem.level == "warning":
            print(str(problem), file=sys.stderr)
    return resolved.config


@command("train")
def run_train(args: argparse.Namespace) -> int:
    config = _valid_config(args)
    if config is None:
        return 1
    errors = _user_errors()
    from .engine.loop import train

    try:
        result = train(config, Path(args.config).resolve().parent, resume=args.resume)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {result.steps} steps in {result.seconds:.1f}s ({result.tokens_per_second:.0f} trained tokens/s)")
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
    if config is None:
        return 1
    errors = _user_errors()
    from .data.inspect import show_data

    try:
        show_data(config, Path(args.config).resolve().parent, args.show)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmtune",
        description="Fine-tune causal language models from one YAML file.",
    )
    parser.add_argument("--version", action="version", version=f"lmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")

    p = sub.add_parser("check", help="validate a config without loading anything heavy")
    p.add_argument("config", help="YAML or JSON config (SageMaker hyperparameters.json works too)")
    with_overrides(p)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--all", action="store_true", help="also list settings left at their defaults")

    p = sub.add_parser("explain", help="what a setting does, or what a config's values mean")
    p.add_argument("target", nargs="?", help="a setting name (any tool's) or a config file")
    with_overrides(p)
    p.add_argument("--markdown", action="store_true", help="print the full reference as Markdown")

    p = sub.add_parser("train", help="fine-tune a model as the config says")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in output_dir from its latest checkpoint, or from CHECKPOINT")

    p = sub.add_parser("data", help="what the data step makes of your files, without training")
    p.add_argument("config")
    with_overrides(p)
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered examples, trained tokens highlighted")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
