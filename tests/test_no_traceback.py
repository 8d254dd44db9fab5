"""Every command on every bad input: one `error:` line naming the problem, a non-zero exit, never a traceback.

The inputs are every bad-config fixture, every bad-data fixture, and odd files
(empty, only comments, a list, not UTF-8, no model, no data), a missing path and
a folder. Commands that take a run folder (`chat`, `export`) get the same paths,
which are not runs. `eval` gets a real trained run, so it reaches the data.
"""

import json
import traceback

import pytest

from lmtune.cli import main

from conftest import FIXTURES

BAD_CONFIGS = sorted((FIXTURES / "bad_configs").glob("*.yaml"))
BAD_DATA = sorted(p / "config.yaml" for p in (FIXTURES / "bad_data").iterdir() if p.is_dir())
ODD = sorted((FIXTURES / "odd_configs").glob("*.yaml"))
MISSING = FIXTURES / "no_such_config.yaml"
FOLDER = FIXTURES / "bad_configs"
INPUTS = BAD_CONFIGS + BAD_DATA + ODD + [MISSING, FOLDER]

# Bad data that only the tokenizer or the model's context length reveals: `check` reads rows
# without either (it never imports torch), so it accepts these and `data`/`train` catch them.
NEEDS_TOKENIZER = {"empty_after_filtering", "max_input_length_beyond_model", "template_does_not_fit_tokenizer"}
# `explain` comments on settings and reads no data rows.
READS_DATA = {"check", "data", "train", "eval"}
COMMANDS = ["check", "explain", "data", "train", "eval", "chat", "export"]


def name_of(path):
    return path.parent.name if path.name == "config.yaml" else path.name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (two-step) run, so `eval` gets past its checkpoint and reaches each config's data."""
    from lmtune.config.load import resolve
    from lmtune.engine.loop import train

    folder = tmp_path_factory.mktemp("matrix")
    data = folder / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(8)))
    config = resolve(data={
        "base_model": "builtin:tiny", "dataset": str(data), "max_steps": 2, "output_dir": str(folder / "run"),
        "cache_dir": str(folder / "cache"), "plot_loss": False, "template": "chatml",
    }).config
    return train(config, quiet=True).run_dir


def argv(command, path, run, cache):
    settings = ["--set", f"cache_dir={cache}", "--set", f"output_dir={cache / 'out'}"]
    if command in ("chat", "export"):
        return [command, str(path)] + (["--prompt", "hi"] if command == "chat" else ["--merge"])
    if command == "explain":
        return [command, str(path)]
    if command == "eval":
        return [command, str(path), "--checkpoint", str(run)] + settings
    return [command, str(path)] + settings


def test_the_matrix_is_large_enough():
    assert len(INPUTS) * len(COMMANDS) >= 60 * 7 - 10
    assert len(INPUTS) >= 60


@pytest.mark.parametrize("command", COMMANDS)
def test_every_bad_input_gives_one_line_and_no_traceback(command, trained_run, tmp_path, capsys, monkeypatch):
    failures = []
    for path in INPUTS:
        if path.parent.parent.name == "bad_data":
            monkeypatch.chdir(path.parent)  # data paths in those configs are relative to their folder
        try:
            code = main(argv(command, path, trained_run, tmp_path / "work"))
        except SystemExit as exc:  # argparse
            code = exc.code
        except Exception:
            failures.append(f"{name_of(path)}: raised\n{traceback.format_exc()}")
            continue
        out = capsys.readouterr()
        text = out.out + out.err
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        exempt = (command == "explain" and path in BAD_DATA) or (command == "check" and name_of(path) in NEEDS_TOKENIZER)
        if "Traceback" in text:
            failures.append(f"{name_of(path)}: traceback in the output: {text[-1500:]}")
        elif exempt:
            continue
        elif code == 0 or not errors:
            failures.append(f"{name_of(path)}: exit {code}, error lines {errors}, output {text[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_check_needs_a_model_and_data_unless_sagemaker_provides_them(capsys, monkeypatch):
    assert main(["check", str(FIXTURES / "odd_configs" / "no_model.yaml")]) == 1
    assert "error: base_model: no model given" in capsys.readouterr().out
    monkeypatch.setenv("SM_CHANNEL_MODEL", "/opt/ml/input/data/model")
    assert main(["check", str(FIXTURES / "odd_configs" / "no_model.yaml")]) == 0
    assert main(["check", str(FIXTURES / "odd_configs" / "no_data.yaml")]) == 1
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
    assert main(["check", str(FIXTURES / "odd_configs" / "no_data.yaml")]) == 0


def test_check_reads_the_rows_and_names_the_bad_one(capsys, monkeypatch):
    folder = FIXTURES / "bad_data" / "bad_role"
    monkeypatch.chdir(folder)
    assert main(["check", "config.yaml"]) == 1
    assert "error: dataset: train.jsonl line 1: `messages[1]` has role 'robot'" in capsys.readouterr().out
