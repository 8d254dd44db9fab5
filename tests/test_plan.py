"""`lmtune plan`: parameter counts against real models, memory and time arithmetic, the verdict in `check`."""

import json

import pytest

from lmtune.cli import main
from lmtune.config.load import resolve
from lmtune.plan import GIB, make_plan, read_model_config, shape_of, trainable_parameters

from conftest import ROOT
from test_architectures import ARCHITECTURES, build

DATA = str(ROOT / "examples" / "data" / "reverse.jsonl")

LLAMA_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_parameter_count_from_config_matches_the_model(kind):
    model = build(kind, pad_token_id=0)
    shape = shape_of(model.config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in model.parameters()), kind


def test_lora_and_freeze_counts_match_what_training_trains(tmp_path):
    from lmtune.model.load import load_model
    from lmtune.model.methods import apply_method, parameter_counts

    for method, extra in (("lora", {"lora_r": 8}), ("lora", {"lora_r": 4, "lora_target": ["attention"]}), ("freeze", {"freeze_trainable_layers": 1})):
        config = resolve(data={"base_model": "builtin:tiny", "method": method, "dataset": DATA, **extra}).config
        model = apply_method(load_model(config), config)
        shape = shape_of(read_model_config("builtin:tiny"))
        assert shape.parameters() == parameter_counts(model)[1] - parameter_counts(model)[0] * (method == "lora")
        assert trainable_parameters(shape, config) == parameter_counts(model)[0], (method, extra)


def config_for(tmp_path, **settings):
    folder = tmp_path / "llama-8b"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    values = {"base_model": str(folder), "dataset": DATA, "precision": "bf16", "max_input_length": 2048, "micro_batch_size": 4, **settings}
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    return resolved.config


def test_an_8b_model_full_fine_tuning_needs_sharding_and_lora_fits(tmp_path):
    full = make_plan(config_for(tmp_path, method="full"), "a100-80g", 1)
    assert full.parameters == 8_030_261_248  # Llama 3 8B
    assert not full.fits
    # 16 bytes per trained parameter before activations: fp32 weights, gradients, AdamW's two states
    static = sum(full.bytes_per_device[k] for k in ("weights", "gradients", "optimizer"))
    assert static == pytest.approx(16 * full.parameters)
    # each suggestion is one change that fits by the same estimate (LoRA alone does not: 4 x 2048 tokens of activations)
    assert any("method: qlora" in s for s in full.suggestions) and any("enable_fsdp: true on" in s for s in full.suggestions)
    sharded = make_plan(config_for(tmp_path, method="full", enable_fsdp=True, gradient_checkpointing=True, micro_batch_size=1), "a100-80g", 8)
    assert sharded.bytes_per_device["optimizer"] == pytest.approx(full.bytes_per_device["optimizer"] / 8)
    lora = make_plan(config_for(tmp_path, method="lora", lora_r=16, gradient_checkpointing=True), "a100-80g", 1)
    assert lora.fits and lora.largest_micro_batch >= 4
    assert lora.bytes_per_device["weights"] == pytest.approx(2 * lora.parameters + 4 * lora.trainable_parameters)
    qlora = make_plan(config_for(tmp_path, method="qlora", gradient_checkpointing=True, micro_batch_size=1), "t4", 1)
    assert qlora.fits and qlora.bytes_per_device["weights"] < 7 * GIB


def test_time_follows_flops_and_the_devices(tmp_path):
    config = config_for(tmp_path, method="lora", gradient_checkpointing=True, max_steps=100)
    one = make_plan(config, "h100", 1)
    eight = make_plan(config, "h100", 8)
    assert eight.tokens_per_second == pytest.approx(8 * one.tokens_per_second)
    assert one.total_tokens == 100 * 4 * 2048 and one.seconds == pytest.approx(one.total_tokens / one.tokens_per_second)
    slower = make_plan(config, "a10g", 1)
    assert slower.tokens_per_second < one.tokens_per_second / 10


def test_plan_command_prints_a_table_and_json(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_8B))
    config.write_text(f"base_model: {tmp_path / 'm'}\nmethod: full\nprecision: bf16\nmax_input_length: 2048\n")
    assert main(["plan", str(config), "--gpu", "a100-40g"]) == 0
    out = capsys.readouterr().out
    assert "plan: does not fit on 1 x a100-40g (40 GiB)" in out and "method: lora" in out
    assert main(["plan", str(config), "--gpu", "h100", "--gpus", "8", "--set", "enable_fsdp=true", "--set", "gradient_checkpointing=true", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 8 and report["peak_bytes_per_device"] > 0 and report["parameters"] == 8_030_261_248
    assert report["tokens_per_second"] > 0 and report["trainable_parameters"] == report["parameters"]
    assert main(["plan", str(config), "--gpu-memory", "lots"]) == 1
    assert "--gpu-memory: 'lots' is not a size" in capsys.readouterr().err


def test_check_prints_the_plan_verdict_for_a_local_model(capsys):
    assert main(["check", str(ROOT / "examples" / "sft_lora.yaml")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert len(lines) == 1 and "fits on 1 x" in lines[0]


def test_rules_of_thumb_for_8b_models_and_the_docs_table():
    from lmtune.plan import REFERENCE_MODELS, estimate, rules_of_thumb
    from lmtune.config.schema import Config

    shape = shape_of(REFERENCE_MODELS["Llama-3.1-8B"])
    per_parameter = {}
    for method in ("full", "lora", "qlora"):
        config = Config.model_validate({"finetuning": {"method": method}, "precision": {"precision": "bf16"}})
        plan = estimate(config, shape, "h100", 1)
        per_parameter[method] = sum(plan.bytes_per_device[k] for k in ("weights", "gradients", "optimizer")) / plan.parameters
    assert per_parameter["full"] == pytest.approx(16, rel=0.01)  # the 16 bytes per parameter of mixed-precision AdamW
    assert 2.0 <= per_parameter["lora"] < 2.2  # a bf16 base and small adapters
    linear = shape.layers * sum(i * o for i, o in shape.layer_linears().values())
    assert 0.5 <= (per_parameter["qlora"] * shape.parameters() - (shape.parameters() - linear) * 2) / linear < 0.7
    assert rules_of_thumb() in (ROOT / "docs" / "planning.md").read_text(), "regenerate docs/planning.md's table"


def test_plan_on_a_local_folder_imports_no_torch(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"base_model": str(build_folder(tmp_path)), "dataset": DATA}))
    code = ("import sys; from lmtune.cli import main; code = main(['plan', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'plan imported torch'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fits on" in done.stdout or "does not fit" in done.stdout


def build_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return folder
