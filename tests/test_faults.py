"""What clusters do to runs: kills at any moment, stop signals, damaged checkpoints, full disks, a second writer,
a resume with other settings, collapse. Every case ends with the data and the last good checkpoint intact, one
line without a traceback, and, where it can go on, a resume that ends bit-identical to an uninterrupted run."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.engine import checkpoint
from lmtune.engine.loop import TrainingError, train
from lmtune.engine.report import read_metrics

from test_train import make_config, sft_rows

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SETTINGS = {
    "lora": dict(method="lora", max_steps=14, save_steps=1, save_total_limit=2, lr_scheduler="cosine", warmup_steps=2),
    "full": dict(method="full", max_steps=14, save_steps=1, save_total_limit=2, lr_scheduler="cosine", warmup_steps=2),
    "dpo": dict(stage="dpo", method="lora", max_steps=10, save_steps=1, save_total_limit=2, micro_batch_size=2, pref_beta=0.1),
}


def pair_rows(n=24):
    return [{"instruction": f"Name item {i % 6}.", "chosen": f"Item {i % 6}.", "rejected": f"No {i}."} for i in range(n)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (folder / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(folder / name)


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmtune", "train", str(config), *extra]


def config_for(tmp_path: Path, kind: str, name: str, **more) -> Path:
    rows = pair_rows() if kind == "dpo" else sft_rows()
    return make_config(tmp_path, rows=rows, name=name, **{**SETTINGS[kind], **more})


def wait_for(predicate, seconds: float = 300.0) -> bool:
    deadline = time.time() + seconds  # only a guard against a hang: far beyond what a busy machine needs
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def staging(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.startswith(".checkpoint-") for p in folder.iterdir())


def newest_intact(run_dir: Path):
    """The newest complete checkpoint, which must verify: a kill never leaves a damaged one in place."""
    found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    for path in found:
        assert checkpoint.damage(path) is None, path
    return found[-1] if found else None


@pytest.mark.parametrize("kind,moments", [("lora", 4), ("full", 3), ("dpo", 3)])
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path, kind, moments):
    straight = train(load_config(config_for(tmp_path, kind, "straight")), quiet=True)
    config = config_for(tmp_path, kind, "killed")
    run_dir = tmp_path / "killed"
    data = tmp_path / "data.jsonl"
    data_digest = digest(data)
    chance = random.Random(f"{kind}-kills")
    total = SETTINGS[kind]["max_steps"]
    resume: list[str] = []
    for moment in range(moments):
        process = subprocess.Popen(command(config, *resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if moment == 0:  # in the middle of writing a checkpoint
            assert wait_for(lambda: staging(run_dir) or process.poll() is not None)
        else:  # a random moment of a random step
            target = min(logged_steps(run_dir) + chance.randint(1, 3), total - 1)
            assert wait_for(lambda: logged_steps(run_dir) >= target or process.poll() is not None)
            time.sleep(chance.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert process.returncode == -signal.SIGKILL, f"the run ended before the kill: {err[-2000:]}"
        assert digest(data) == data_digest
        newest_intact(run_dir)
        resume = ["--resume"] if newest_intact(run_dir) else ["--set", "overwrite_output_dir=true"]
    done = subprocess.run(command(config, *resume), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not staging(run_dir), "a kill's half-written checkpoint was left behind"
    assert same_weights(straight.final_dir, run_dir / "final")
    assert curve(straight.run_dir) == curve(run_dir)


@pytest.mark.parametrize("sent,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_a_checkpoint_and_says_how_to_go_on(tmp_path, sent, code):
    settings = dict(method="lora", max_steps=40, lr_scheduler="cosine")
    straight = train(load_config(make_config(tmp_path, name="straight", **settings)), quiet=True)
    config = make_config(tmp_path, name="stopped", **settings)
    process = subprocess.Popen(command(config), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: logged_steps(tmp_path / "stopped") >= 3)
    process.send_signal(sent)
    _, err = process.communicate(timeout=300)
    assert process.returncode == code, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"stopped by {sent.name} at step" in errors[0], err[-2000:]
    assert f"continue with: lmtune train {config} --resume" in errors[0]
    saved = newest_intact(tmp_path / "stopped")
    assert saved is not None and str(saved) in errors[0]
    assert not (tmp_path / "stopped" / "final").exists()
    done = subprocess.run(command(config, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_weights(straight.final_dir, tmp_path / "stopped" / "final")
    assert curve(straight.run_dir) == curve(tmp_path / "stopped")


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(state):
        if state.global_step == step:
            raise Killed

    return on_step


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted run, and the same run killed at step 5 with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("interrupted")
    settings = dict(method="lora", max_steps=8, save_steps=2, save_total_limit=3, lr_scheduler="cosine")
    straight = train(load_config(make_config(folder, name="straight", **settings)), quiet=True)
    config = make_config(folder, name="killed", **settings)
    with pytest.raises(Killed):
        train(load_config(config), quiet=True, on_step=kill_at(5))
    return straight, config


def copy_of(config: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The interrupted run's folder copied into this test's folder, and its config pointing there."""
    copy = tmp_path / "killed"
    shutil.copytree(config.parent / "killed", copy)
    moved = tmp_path / "killed.yaml"
    moved.write_text(config.read_text().replace(str(config.parent / "killed"), str(copy)))
    return copy, moved


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bits(path: Path) -> None:
    body = bytearray(path.read_bytes())
    chance = random.Random(0)
    header = 8 + int.from_bytes(body[:8], "little")
    for _ in range(2000):  # in the tensors, past the header
        at = chance.randrange(header, len(body))
        body[at] ^= 1 << chance.randrange(8)
    path.write_bytes(bytes(body))


DAMAGE = {
    "weights cut": lambda c: cut(c / "trainable.safetensors"),
    "weights emptied": lambda c: (c / "trainable.safetensors").write_bytes(b""),
    "weights deleted": lambda c: (c / "trainable.safetensors").unlink(),
    "weights bit-flipped": lambda c: flip_bits(c / "trainable.safetensors"),
    "training state cut": lambda c: cut(c / "training_state.pt"),
    "loop state cut": lambda c: cut(c / "state.json"),
    "checksums cut": lambda c: cut(c / "checksums.json"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(interrupted, tmp_path, how, capsys):
    straight, config = interrupted
    copy, moved = copy_of(config, tmp_path)
    DAMAGE[how](copy / "checkpoints" / "checkpoint-4")
    assert main(["train", str(moved), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-4 skipped:" in out and "resumed from" in out and "checkpoint-2 at step 2" in out, out
    assert same_weights(straight.final_dir, copy / "final")
    assert curve(straight.run_dir) == curve(copy)


def test_a_resume_with_every_checkpoint_damaged_or_none_says_so_before_loading(interrupted, tmp_path, capsys):
    _, config = interrupted
    copy, moved = copy_of(config, tmp_path)
    for path in (copy / "checkpoints").glob("checkpoint-*"):
        cut(path / "trainable.safetensors")
    assert main(["train", str(moved), "--resume"]) == 1
    captured = capsys.readouterr()
    assert "no checkpoint in" in captured.err and "overwrite_output_dir=true" in captured.err
    assert "data:" not in captured.out, "the data was loaded before the resume was refused"
    shutil.rmtree(copy / "checkpoints")
    assert main(["train", str(moved), "--resume"]) == 1
    assert "holds no checkpoint (the run stopped before its first one)" in capsys.readouterr().err
    assert main(["train", str(moved)]) == 1
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert main(["train", str(moved), "--set", "overwrite_output_dir=true"]) == 0


def test_orphan_staging_folders_are_removed_on_resume(interrupted, tmp_path, capsys):
    _, config = interrupted
    copy, moved = copy_of(config, tmp_path)
    orphan = copy / "checkpoints" / ".checkpoint-5-abcd"
    orphan.mkdir()
    (orphan / "trainable.safetensors").write_bytes(b"half")
    assert main(["train", str(moved), "--resume"]) == 0
    assert not orphan.exists()
    assert "removed 1 half-written folder" in capsys.readouterr().out


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(tmp_path, capsys, monkeypatch):
    config = make_config(tmp_path, method="lora", max_steps=8, save_steps=2)
    writes = {"count": 0}
    real = checkpoint.save_file

    def second_fails(*args, **kwargs):
        writes["count"] += 1
        if writes["count"] == 2:
            no_space()
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", second_fails)
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "could not write" in lines[0] and "checkpoint-4" in lines[0] and "the disk is full" in lines[0]
    assert "MiB free there" in lines[0] and "earlier checkpoints are kept" in lines[0]
    assert checkpoint.damage(tmp_path / "run" / "checkpoints" / "checkpoint-2") is None
    assert not staging(tmp_path / "run")


def test_a_full_disk_at_the_final_save_leaves_no_half_written_final(tmp_path, capsys, monkeypatch):
    import lmtune.engine.loop as loop

    config = make_config(tmp_path, method="lora", max_steps=4, save_steps=2)

    def half_then_full(model, tokenizer, config, folder, state=None):
        (folder / "config.json").write_text("{}")
        no_space()

    monkeypatch.setattr(loop, "save_final", half_then_full)
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "error: final: could not write" in err and "the disk is full" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()
    assert not list((tmp_path / "run").glob(".final-*"))
    assert checkpoint.damage(tmp_path / "run" / "checkpoints" / "checkpoint-2") is None


def test_one_writer_per_run_folder(tmp_path):
    config = make_config(tmp_path, method="lora", max_steps=100000, save_steps=2)
    first = subprocess.Popen(command(config), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: logged_steps(tmp_path / "run") >= 3)
        for extra in ([], ["--resume"], ["--set", "overwrite_output_dir=true"]):
            second = subprocess.run(command(config, *extra), env=ENV, capture_output=True, text=True)
            assert second.returncode == 1
            assert f"is being written by a live run (pid {first.pid} on" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # its holder gone, the lock is taken over by the resume, which goes on from the last checkpoint
    taken = subprocess.Popen(command(config, "--resume"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = logged_steps(tmp_path / "run")
    assert wait_for(lambda: logged_steps(tmp_path / "run") >= before + 3 or taken.poll() is not None)
    taken.send_signal(signal.SIGTERM)
    out, err = taken.communicate(timeout=300)
    assert taken.returncode == 143, err[-2000:]
    assert "resumed from" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)), "two writers' lines in one log"


CHANGES = {
    "learning_rate": "0.05", "max_steps": "20", "lr_scheduler": "linear", "warmup_steps": "3", "method": "full",
    "lora_r": "4", "lora_target": "q_proj", "template": "llama3", "max_input_length": "64", "seed": "7",
    "dataset": "other.jsonl",
}


def test_a_resume_with_changed_settings_names_each_and_changes_nothing(interrupted, tmp_path, capsys):
    _, config = interrupted
    copy, moved = copy_of(config, tmp_path)
    (tmp_path / "other.jsonl").write_text((config.parent / "data.jsonl").read_text())
    resolved = (copy / "config.resolved.yaml").read_text()
    for key, value in CHANGES.items():
        value = str(tmp_path / value) if key == "dataset" else value
        assert main(["train", str(moved), "--resume", "--set", f"{key}={value}"]) == 1, key
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"{key} " in lines[0] and "does not match this config's" in lines[0], (key, err)
        assert (copy / "config.resolved.yaml").read_text() == resolved, f"{key} was written as if it were used"
    # what only changes how the run is logged goes on
    assert main(["train", str(moved), "--resume", "--set", "logging_steps=2"]) == 0


def test_a_collapsed_run_stops_and_names_the_cause(tmp_path):
    settings = dict(method="full", learning_rate=1000.0, max_steps=40, lr_scheduler="constant")
    with pytest.raises(TrainingError, match=r"exactly zero for 5 steps.*collapsed.*learning_rate 1000 .*stop_on_divergence"):
        train(load_config(make_config(tmp_path, name="collapsed", **settings)), quiet=True)
    went_on = train(load_config(make_config(tmp_path, name="allowed", stop_on_divergence=False, **settings)), quiet=True)
    assert went_on.steps == 40


def test_a_stop_signal_before_training_is_one_line(tmp_path):
    """Ctrl-C while the model loads: nothing to save, no KeyboardInterrupt traceback."""
    config = make_config(tmp_path, method="lora", max_steps=2)
    process = subprocess.Popen(command(config), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / "run" / "config.resolved.yaml").exists() or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.skip("the two steps finished before the signal arrived")
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]


def rank_pid(launcher: subprocess.Popen, rank: int):
    """The pid of the launched process with RANK=rank among the launcher's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launched processes through /proc")
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_hung_rank_is_named_by_the_launcher(tmp_path, how):
    config = make_config(tmp_path, method="lora", max_steps=100000, micro_batch_size=2, ddp_timeout=20)
    launcher = subprocess.Popen(command(config, "--nproc", "2"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert wait_for(lambda: logged_steps(tmp_path / "run") >= 2 or launcher.poll() is not None)
        pid = rank_pid(launcher, 1)
        assert pid is not None
        started = time.time()
        os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        _, err = launcher.communicate(timeout=600)
        took = time.time() - started
    finally:
        if launcher.poll() is None:
            launcher.kill()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert launcher.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert errors and errors[-1].startswith("error: rank 1 "), err[-3000:]
    if how == "killed":
        assert "was killed by SIGKILL" in errors[-1]
    else:
        assert "stopped answering" in errors[-1] and took >= 20  # ddp_timeout bounds the wait
    assert "; its last lines:" in errors[-1]


def test_sigterm_to_a_launch_stops_every_process_at_one_step_and_it_resumes(tmp_path):
    settings = dict(method="lora", max_steps=60, micro_batch_size=2, lr_scheduler="cosine")
    straight = make_config(tmp_path, name="straight", **settings)
    done = subprocess.run(command(straight, "--nproc", "2"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    config = make_config(tmp_path, name="stopped", **settings)
    launcher = subprocess.Popen(command(config, "--nproc", "2"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    assert wait_for(lambda: logged_steps(tmp_path / "stopped") >= 3)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert launcher.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "stopped by SIGTERM at step" in errors[0], err[-3000:]
    assert f"continue with: lmtune train {config} --nproc 2 --resume" in errors[0]
    assert newest_intact(tmp_path / "stopped") is not None
    resumed = subprocess.run(command(config, "--nproc", "2", "--resume"), env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "straight" / "final", tmp_path / "stopped" / "final")
    assert curve(tmp_path / "straight") == curve(tmp_path / "stopped")


def test_a_template_that_leaves_no_room_is_refused_before_tokenising(tokenizer):
    from lmtune.data.pipeline import leaves_room
    from lmtune.data.records import DataError
    from lmtune.data.templates import pick_renderer

    renderer = pick_renderer(tokenizer, "chatml", False, False)
    records = [{"kind": "chat", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match=r"max_input_length: 18 tokens leave no room.*template alone takes \d+ tokens"):
        leaves_room(records, renderer, tokenizer, 18)
    leaves_room(records, renderer, tokenizer, 64)


def test_byte_order_marks_and_text_parts_are_read(tmp_path):
    from lmtune.data.records import normalise, read_rows

    (tmp_path / "excel.csv").write_text("instruction,output\nq,a\n", encoding="utf-8-sig")
    (tmp_path / "notepad.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n", encoding="utf-8-sig")
    for name in ("excel.csv", "notepad.jsonl"):
        assert [row.values for row in read_rows(str(tmp_path / name))] == [{"instruction": "q", "output": "a"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": "yes"}]}
    from lmtune.data.records import Row

    assert normalise(Row(parts, "x line 1"), "chat")["messages"][0]["content"] == "hi there"


@pytest.mark.parametrize("value", ['["jsonl","stdout"]', "['jsonl', 'stdout']", "jsonl,stdout"])
def test_sagemaker_list_hyperparameters_in_every_shape(value):
    from lmtune.config.load import resolve

    resolved = resolve(data={"base_model": "builtin:tiny", "report_to": value})
    assert not resolved.errors and resolved.config.output.report_to == ["jsonl", "stdout"]


def test_an_empty_override_is_named(tmp_path, capsys):
    config = make_config(tmp_path)
    assert main(["check", str(config), "--set", "lora_target="]) == 1
    assert "error: lora_target: `--set lora_target=` gives no value" in capsys.readouterr().out


def test_a_hundred_thousand_deep_row_is_one_line(tmp_path, capsys):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}\n')
    config = make_config(tmp_path)
    assert main(["check", str(config), "--set", f"dataset={data}"]) == 1
    out = capsys.readouterr().out
    assert "deep.jsonl line 1: nested deeper than any dataset row needs" in out and "Traceback" not in out


def test_a_lock_from_a_host_that_is_gone_is_taken_over(tmp_path, monkeypatch):
    from lmtune.engine import lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / lock.NAME).write_text(json.dumps({"host": "other-host", "pid": 1, "started": "then"}))
    with pytest.raises(lock.RunLocked, match=r"pid 1 on other-host.*taken over 5 minutes after its last sign of life"):
        lock.FolderLock(folder).acquire()
    held = lock.FolderLock(folder, sole_writer=True)  # a SageMaker job restored its folder with the old instance's lock
    held.acquire()
    held.release()
    (folder / lock.NAME).write_text(json.dumps({"host": "other-host", "pid": 1, "started": "then"}))
    old = time.time() - lock.GONE_AFTER_S - 60
    os.utime(folder / lock.NAME, (old, old))
    taken = lock.FolderLock(folder)
    taken.acquire()
    assert lock.holder(folder)["pid"] == os.getpid()
    taken.release()
    assert lock.holder(folder) == {"released": True}
