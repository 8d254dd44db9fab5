"""ppo: its mathematics against hand computations, learning from a rule-based reward and from an rm run,
outputs, and kill-and-resume."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.config.load import resolve
from lmtune.engine.loop import train
from lmtune.engine.report import read_metrics
from lmtune.stages.ppo.objective import AdaptiveKL, RunningMoments, gae, policy_loss, token_rewards, value_loss, whiten
from lmtune.stages.rl.prompts import prompts_for

ANSWER_WORDS = ["thanks", "good", "bad", "small", "large", "fast", "slow", "new"]
REWARD_FILE = '''
def thanks(prompts, answers):
    """The share of the answer's words that are "thanks"."""
    out = []
    for answer in answers:
        words = answer.split()
        out.append(sum(w == "thanks" for w in words) / max(len(words), 1))
    return out
'''


# -- the mathematics on fixed numbers -----------------------------------------------------------


def test_token_rewards_put_the_score_on_each_answers_last_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [0.05, -1.0, 0.0]])
    assert torch.allclose(out, expected)


def test_gae_matches_the_recursion_by_hand():
    rewards = torch.tensor([[0.0, 0.5, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.1]])
    mask = torch.tensor([[1, 1, 1]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.1
    d1 = 0.5 + gamma * 0.1 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(returns, torch.tensor([[a0 + 0.2, a1 + 0.4, a2 + 0.1]]))
    # nothing flows from beyond an answer's end
    short, _ = gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma, lam)
    assert short[0, 2] == 0 and torch.isclose(short[0, 1], torch.tensor(0.5 - 0.4))


def test_clipped_losses_by_hand():
    logps, old = torch.tensor([0.0, 0.0, -1.0]), torch.tensor([-0.5, 0.5, -1.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    loss, clipped = policy_loss(logps, old, advantages, clip=0.2)
    r0, r1 = torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-0.5))
    assert torch.allclose(loss, torch.stack([torch.max(-r0, torch.tensor(-1.2)), torch.max(r1, torch.tensor(0.8)), torch.tensor(-2.0)]))
    assert clipped.tolist() == [1.0, 1.0, 0.0]
    v = value_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), clip=0.2)
    assert torch.allclose(v, torch.tensor([0.5 * 0.8**2, 0.5]))


def test_whitening_and_the_controllers():
    values, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    white = whiten(values, mask)
    assert abs(float(white[:3].mean())) < 1e-6 and abs(float(white[:3].pow(2).mean()) - 1) < 1e-4 and white[3] == 0
    kl = AdaptiveKL(0.1, target=1.0)
    assert kl.update(3.0, answers=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))
    assert AdaptiveKL(0.1, target=None).update(3.0, 100) == 0.1
    moments, seen = RunningMoments(), []
    for chunk in (torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0, 9.0])):
        moments.update(chunk)
        seen += chunk.tolist()
    everything = torch.tensor(seen)
    assert moments.mean == pytest.approx(float(everything.mean()))
    assert moments.var == pytest.approx(float(everything.var(unbiased=False)))


def test_prompt_order_is_a_function_of_the_iteration():
    first = [prompts_for(i, 4, 10, seed=3) for i in range(5)]
    assert first == [prompts_for(i, 4, 10, seed=3) for i in range(5)]
    flat = [i for chunk in first for i in chunk]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # every prompt once per epoch


# -- learning ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def words_policy(tmp_path_factory):
    """A tiny model taught by sft to answer with a few words; ppo then asks for more "thanks"."""
    folder = tmp_path_factory.mktemp("ppo")
    rng = random.Random(0)
    rows = [{"instruction": "Say some words.", "output": " ".join(rng.choices(ANSWER_WORDS, k=6))} for _ in range(200)]
    (folder / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "reward.py").write_text(REWARD_FILE)
    values = {
        "base_model": "builtin:tiny", "dataset": str(folder / "words.jsonl"), "template": "chatml", "stage": "sft",
        "method": "full", "micro_batch_size": 8, "epochs": 3, "learning_rate": 3e-3, "lr_scheduler": "constant",
        "validation_split_ratio": 0.0, "output_dir": str(folder / "sft"), "cache_dir": str(folder / "cache"), "plot_loss": False,
    }
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    train(resolved.config, quiet=True)
    return folder


def ppo_config(folder, out, method, **settings):
    values = {
        "base_model": str(folder / "sft" / "final"), "dataset": str(folder / "words.jsonl"), "template": "chatml",
        "stage": "ppo", "method": method, "reward_function": str(folder / "reward.py") + ":thanks",
        "micro_batch_size": 8, "ppo_buffer_size": 4, "ppo_epochs": 4, "max_new_tokens": 8,
        "learning_rate": 1e-3 if method == "lora" else 3e-4, "lr_scheduler": "constant", "max_steps": 24,
        "validation_split_ratio": 0.2, "eval_strategy": "steps", "eval_steps": 12, "per_device_eval_batch_size": 20,
        "logging_steps": 1, "seed": 0, "output_dir": str(out), "cache_dir": str(folder / "cache"), "plot_loss": False,
    }
    values.update(settings)
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    return resolved.config


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_raises_the_reward_of_fresh_answers_with_the_kl_bounded(words_policy, tmp_path, method):
    # the output head trained whole beside the adapters (modules_to_save): the reference still switches it off
    extra = {"lora_r": 16, "lora_modules_to_save": ["lm_head"]} if method == "lora" else {}
    result = train(ppo_config(words_policy, tmp_path / "run", method, **extra), quiet=True)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_reward_mean" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 24
    start, end = evals[0]["eval_reward_mean"], evals[-1]["eval_reward_mean"]
    assert end > start + 0.08, (start, end)  # the same held-out prompts, sampled from the same seed
    steps = [r for r in records if "reward_mean" in r]
    assert len(steps) == 24 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's
    assert max(r["kl"] for r in steps) < 15.0  # nats per answer of at most 8 tokens: the leash holds
    for key in ("entropy", "clip_fraction", "value_loss", "response_length", "policy_loss", "kl_coef"):
        assert key in steps[-1]
    # outputs: the policy in HF / PEFT format, the value head beside it, and chat works on it
    final = result.final_dir
    assert (final / ("adapter_config.json" if method == "lora" else "model.safetensors")).exists()
    assert set(load_file(final / "value_head.safetensors")) == {"weight", "bias"}
    if method == "lora":
        from peft import AutoPeftModelForCausalLM

        assert AutoPeftModelForCausalLM.from_pretrained(final) is not None
    else:
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(final) is not None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ppo_kill_and_resume_continue_the_same_curve(words_policy, tmp_path, method):
    settings = dict(max_steps=6, save_steps=2, validation_split_ratio=0.0, eval_strategy="no")
    straight = train(ppo_config(words_policy, tmp_path / "straight", method, **settings), quiet=True)

    class Killed(Exception):
        pass

    def kill_at_5(state):
        if state.global_step == 5:
            raise Killed

    config = ppo_config(words_policy, tmp_path / "killed", method, **settings)
    with pytest.raises(Killed):
        train(config, quiet=True, on_step=kill_at_5)
    resumed = train(config, resume="latest", quiet=True)

    def curve(run):
        return [(r["step"], r["reward_mean"], r["loss"], r["kl"]) for r in read_metrics(run.run_dir / "metrics.jsonl")]

    assert curve(straight) == curve(resumed)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(straight.final_dir / "value_head.safetensors")["weight"], load_file(resumed.final_dir / "value_head.safetensors")["weight"])


def test_ppo_with_an_rm_run_as_the_reward_model(words_policy, tmp_path):
    rng = random.Random(1)
    pairs = []
    for _ in range(64):
        filler = " ".join(rng.choices(ANSWER_WORDS[1:], k=3))
        pairs.append({"prompt": "Say some words.", "chosen": f"{filler} thanks", "rejected": f"{filler} {rng.choice(ANSWER_WORDS[1:])}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rm = resolve(data={
        "base_model": str(words_policy / "sft" / "final"), "dataset": str(tmp_path / "pairs.jsonl"), "template": "chatml",
        "stage": "rm", "method": "lora", "micro_batch_size": 8, "max_steps": 4, "learning_rate": 1e-2,
        "validation_split_ratio": 0.0, "output_dir": str(tmp_path / "rm"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False,
    })
    assert not rm.errors, rm.errors
    train(rm.config, quiet=True)
    config = ppo_config(
        words_policy, tmp_path / "ppo", "lora", reward_function=None, reward_model=str(tmp_path / "rm"),
        max_steps=2, validation_split_ratio=0.0, eval_strategy="no",
    )
    result = train(config, quiet=True)
    steps = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward_mean" in r]
    assert len(steps) == 2 and all(isinstance(r["reward_mean"], float) for r in steps)
    assert (result.final_dir / "adapter_config.json").exists()


def test_ppo_refuses_a_reward_model_with_another_vocabulary(words_policy, tmp_path, capsys):
    other = tmp_path / "other"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "a": 1, "b": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>").save_pretrained(other)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=1, pad_token_id=0))
    model.save_pretrained(other)
    config = tmp_path / "ppo.yaml"
    values = {"base_model": str(words_policy / "sft" / "final"), "dataset": str(words_policy / "words.jsonl"), "stage": "ppo", "reward_model": str(other), "template": "chatml", "max_steps": 1, "output_dir": str(tmp_path / "run"), "cache_dir": str(words_policy / "cache")}
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "reward_model:" in err and "different vocabulary" in err
