"""Every stage on several processes (gloo on CPU): rm, dpo, kto, ppo and grpo data parallel, and sharded with full
fine-tuning. Each trains like one process with the same global batch, and a checkpoint written by two processes
resumes in one and continues the same curve."""

import random
import shutil

import pytest
from safetensors.torch import load_file

from test_distributed import WEIGHTS_AGREE, close, final_weights, launch, losses
from test_train import make_config, run

REWARD = '''
def length(prompts, answers):
    return [len(a) / 20 for a in answers]
'''


def stage_settings(tmp_path, stage):
    from test_alignment import preference_rows
    from test_kto import unpaired_rows

    if stage in ("rm", "dpo"):
        return dict(rows=preference_rows(12), stage=stage, micro_batch_size=2)
    if stage == "kto":
        return dict(rows=unpaired_rows(8), stage="kto", micro_batch_size=2)
    (tmp_path / "reward.py").write_text(REWARD)
    if stage == "grpo":
        rows = [{"prompt": f"Count to {i}."} for i in range(12)]
        return dict(rows=rows, stage="grpo", micro_batch_size=2, reward_function=str(tmp_path / "reward.py") + ":length",
                    num_generations=2, max_new_tokens=6, top_k=0)
    rng = random.Random(0)
    rows = [{"instruction": "Say " + " ".join(rng.choices(["thanks", "good", "red"], k=2)) + ".", "output": "ok"} for _ in range(24)]
    return dict(rows=rows, stage="ppo", micro_batch_size=2, reward_function=str(tmp_path / "reward.py") + ":length",
                max_new_tokens=6, ppo_epochs=2, ppo_buffer_size=2)


METHODS = {
    "lora": {"method": "lora", "lora_r": 4, "lora_dropout": 0.0, "learning_rate": 1e-2, "lora_target": "all"},
    "full": {"method": "full", "learning_rate": 2e-3},
}
CASES = [("rm", "lora", False), ("dpo", "lora", False), ("kto", "lora", False), ("ppo", "lora", False),
         ("ppo", "full", False), ("dpo", "full", True), ("kto", "full", True), ("rm", "full", True), ("ppo", "full", True),
         ("grpo", "lora", False), ("grpo", "full", True)]


@pytest.mark.parametrize("stage,method,fsdp", CASES, ids=[f"{s}-{m}{'-fsdp' if f else ''}" for s, m, f in CASES])
def test_two_processes_train_like_one_and_resume_in_one(tmp_path, stage, method, fsdp):
    settings = dict(**stage_settings(tmp_path, stage), **METHODS[method], max_steps=4, save_steps=2, seed=1)
    done = launch(make_config(tmp_path, name="two", enable_fsdp=fsdp, **settings))
    assert done.returncode == 0, done.stderr[-3000:]
    layout = "FSDP2 (full_shard)" if fsdp else "data parallel"
    assert f"processes: 2, {layout} over gloo" in done.stdout
    two = losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]

    one = run(make_config(tmp_path, name="one", gradient_accumulation_steps=2, **settings))
    # ppo's loss is a near-zero sum of signed terms: its float noise is judged against 1e-6 absolute too
    assert list(losses(one.run_dir).values()) == pytest.approx(list(two.values()), rel=1e-5, abs=1e-6)
    assert close(final_weights(one.run_dir), final_weights(tmp_path / "two")) < WEIGHTS_AGREE

    # The two-process checkpoint at step 2, resumed in one process (accumulating 2: the same global batch).
    saved = tmp_path / "resumed-from"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "checkpoint-2", saved)
    alone = run(make_config(tmp_path, name="alone", gradient_accumulation_steps=2, **settings), resume=str(saved))
    assert sorted(losses(alone.run_dir)) == [3, 4]  # its own folder: the log starts where it resumed
    assert [losses(alone.run_dir)[s] for s in (3, 4)] == pytest.approx([two[3], two[4]], rel=1e-5, abs=1e-6)
    assert close(final_weights(alone.run_dir), final_weights(tmp_path / "two")) < WEIGHTS_AGREE
    if stage == "ppo":
        heads = [load_file(folder / "final" / "value_head.safetensors") for folder in (tmp_path / "two", alone.run_dir)]
        assert close(*heads) < WEIGHTS_AGREE and heads[0]["weight"].abs().max() > 0  # trained, and the same


def test_a_stage_that_cannot_run_a_layout_is_refused_in_one_line_naming_the_setting():
    from lmtune.config.load import resolve
    from lmtune.stages.base import Stage

    class OneProcessOnly(Stage):
        name, data_parallel = "demo", False

    class NoSharding(Stage):
        name, shards = "demo", False

    config = resolve(data={"enable_fsdp": True}).config
    assert OneProcessOnly().layout_problem(config, 2, False) == "stage: demo trains in one process in this version; launch one process"
    assert NoSharding().layout_problem(config, 2, True).startswith("enable_fsdp: stage demo does not shard in this version")
    assert NoSharding().layout_problem(config, 2, False) is None and OneProcessOnly().layout_problem(config, 1, False) is None
