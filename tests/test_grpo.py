"""grpo: its losses against independent computations, the group sampler against generate, the shared-prompt layout
against plain sequences, learning from verifiable rewards, and what it refuses."""

import json
import math

import pytest
import torch

from lmtune.cli import main
from lmtune.config.load import resolve
from lmtune.engine.loop import train
from lmtune.engine.report import read_metrics
from lmtune.stages.grpo.loss import group_advantages, token_terms, token_weights
from test_ppo import words_policy  # noqa: F401  (the fixture: a tiny model taught to answer with words)

# -- the mathematics on fixed numbers -------------------------------------------------------------

# Two micro batches of a step: 3 answers (lengths 2, 3, 1) and 1 answer (length 2).
LOGPS = [[-1.0, -2.0], [-0.5, -1.5, -0.2], [-3.0], [-0.7, -0.9]]
OLD = [[-1.2, -1.8], [-0.5, -1.0, -0.4], [-2.0], [-0.6, -1.4]]
REF = [[-1.1, -2.5], [-0.4, -1.2, -0.3], [-2.5], [-0.8, -1.0]]
ADVANTAGES = [0.8, -1.1, 0.3, -0.5]
MASKED = {2}  # answer 2 ran out of tokens and is masked


def by_hand(kind, epsilon=0.2, epsilon_high=0.28, sequence=False, beta=0.0, max_new=4):
    """The step's loss, token by token in plain Python."""
    per_answer = []
    for i, (lp, old, ref) in enumerate(zip(LOGPS, OLD, REF)):
        keep = 0.0 if i in MASKED else 1.0
        seq_ratio = math.exp(sum(l - o for l, o in zip(lp, old)) / len(lp)) if sequence else None
        terms = []
        for l, o, r in zip(lp, old, ref):
            ratio = seq_ratio if sequence else math.exp(l - o)
            a = ADVANTAGES[i]
            loss = -min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon_high) * a)
            loss += beta * (math.exp(r - l) - (r - l) - 1)
            terms.append(loss * keep)
        per_answer.append(terms)
    answers = len(LOGPS)
    tokens = [len(t) * (0.0 if i in MASKED else 1.0) for i, t in enumerate(per_answer)]
    if kind == "grpo":
        return sum(sum(t) / max(n, 1) for t, n in zip(per_answer, tokens)) / answers
    if kind == "dapo":
        return sum(sum(t) for t in per_answer) / sum(tokens)
    if kind == "bnpo":
        first, second = per_answer[:3], per_answer[3:]
        return (sum(sum(t) for t in first) / sum(tokens[:3]) + sum(sum(t) for t in second) / sum(tokens[3:])) / 2
    return sum(sum(t) for t in per_answer) / (answers * max_new)


def by_lmtune(kind, epsilon=0.2, epsilon_high=0.28, sequence=False, beta=0.0, max_new=4):
    total = 0.0
    masks = [torch.full((len(t),), 0.0 if i in MASKED else 1.0) for i, t in enumerate(LOGPS)]
    step_tokens = int(sum(m.sum() for m in masks))
    for answers in ([0, 1, 2], [3]):
        flat = lambda rows: torch.tensor([v for i in answers for v in rows[i]], dtype=torch.float64)  # noqa: E731
        answer_of = torch.repeat_interleave(torch.arange(len(answers)), torch.tensor([len(LOGPS[i]) for i in answers]))
        mask = torch.cat([masks[i] for i in answers]).double()
        terms = token_terms(flat(LOGPS), flat(OLD), torch.tensor([ADVANTAGES[i] for i in answers], dtype=torch.float64), answer_of,
                            mask, len(answers), epsilon, epsilon_high, sequence, flat(REF), beta)
        counted = torch.zeros(len(answers), dtype=torch.float64).index_add(0, answer_of, mask)
        weights = token_weights(kind, answer_of, mask, counted, step_answers=4, step_tokens=step_tokens, micro_tokens=int(mask.sum()),
                                step_micro_batches=2, max_new_tokens=max_new)
        total += float((terms.loss * weights).sum())
    return total


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("variant", [{}, {"sequence": True, "epsilon": 0.05, "epsilon_high": 0.05}, {"beta": 0.04}, {"epsilon_high": 0.2}],
                         ids=["clip-higher", "gspo", "kl", "symmetric"])
def test_each_loss_variant_matches_the_formula(kind, variant):
    assert by_lmtune(kind, **variant) == pytest.approx(by_hand(kind, **variant), rel=1e-12, abs=1e-12)


def test_the_variants_differ_where_their_papers_say():
    values = {kind: by_hand(kind) for kind in ("grpo", "dr_grpo", "dapo", "bnpo")}
    assert len({round(v, 9) for v in values.values()}) == 4  # each normalisation is its own
    assert by_hand("dapo", epsilon_high=0.28) != by_hand("dapo", epsilon_high=0.2)  # clip-higher changes clipped tokens
    assert by_hand("dapo", sequence=True) != by_hand("dapo")


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    scaled, spread = group_advantages(rewards, 3, scale=True)
    first = [1.0, 0.0, 0.0]
    mean = sum(first) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in first) / 2)  # unbiased, as TRL
    assert scaled[:3].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in first])
    second = [1.0, 2.0, 2.0]
    mean = sum(second) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in second) / 2)
    assert scaled[3:].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in second])
    assert spread.tolist() == pytest.approx([math.sqrt(1 / 3), std])  # one spread per group
    raw, _ = group_advantages(rewards, 3, scale=False)
    assert raw.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    _, spread = group_advantages(torch.tensor([0.5, 0.5, 1.0, 0.0]), 2, scale=True)
    assert spread.tolist()[:1] == [0.0]  # an all-equal group: no gradient, and counted as such


# -- the sampler and the layouts --------------------------------------------------------------------


def tiny():
    from lmtune.model.builtin import builtin_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = builtin_path("builtin:tiny")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_greedy_groups_equal_generate_for_prompts_of_different_lengths():
    """top_k 1 makes sampling greedy: each prompt, computed once and copied to its group, continues as generate does."""
    from types import SimpleNamespace

    from lmtune.generate import stop_ids
    from lmtune.stages.rl.sampling import generators_for, sample_groups

    model, tokenizer = tiny()
    prompts = [tokenizer("the cat sat", add_special_tokens=False)["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]]
    settings = SimpleNamespace(max_new_tokens=8, temperature=0.7, top_k=1, top_p=1.0)
    stops = stop_ids(tokenizer, model)
    groups = sample_groups(model, prompts, 3, settings, stops, tokenizer.pad_token_id, generators_for([1, 2]), torch.device("cpu"))
    for index, prompt in enumerate(prompts):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        for row in range(3 * index, 3 * index + 3):
            got = groups.answers[row][groups.answer_mask[row].bool()].tolist()
            assert got == expected[: len(got)] and len(got) == len([t for t in expected if t != tokenizer.pad_token_id][:8])


def test_a_groups_answers_depend_on_its_seed_not_on_its_batch():
    from types import SimpleNamespace

    from lmtune.generate import stop_ids
    from lmtune.stages.rl.sampling import generators_for, sample_groups

    model, tokenizer = tiny()
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("one two", "three four five six"))
    settings = SimpleNamespace(max_new_tokens=6, temperature=1.0, top_k=0, top_p=0.9)
    stops = stop_ids(tokenizer, model)
    together = sample_groups(model, [a, b], 4, settings, stops, tokenizer.pad_token_id, generators_for([7, 8]), torch.device("cpu"))
    alone = sample_groups(model, [a], 4, settings, stops, tokenizer.pad_token_id, generators_for([7]), torch.device("cpu"))
    assert together.answer_ids()[:4] == alone.answer_ids()
    assert len(set(map(tuple, alone.answer_ids()))) > 1  # sampled: the group's answers differ


def test_top_p_and_top_k_keep_the_right_tokens():
    from lmtune.stages.rl.sampling import filtered

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filtered(logits, 0, 0.7)).tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(filtered(logits, 3, 1.0)).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "phi3"])
def test_answers_sharing_their_prompt_give_the_same_log_probabilities(kind):
    from test_architectures import ARCHITECTURES, build

    from lmtune.model.packed_attention import use_packed_attention
    from lmtune.stages.grpo.batches import Answer, answer_token_logps, collate

    if kind not in ARCHITECTURES:
        pytest.skip(f"{kind} is not in the architecture matrix")
    model = build(kind, pad_token_id=0)
    use_packed_attention(model)
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=generator).tolist()  # noqa: E731
    first, second = ids(20), ids(9)
    answers = [Answer(0, first, ids(n), False, [0.0]) for n in (5, 12, 3)] + [Answer(1, second, ids(n), False, [0.0]) for n in (7, 2)]
    results = []
    for packing, share in ((True, True), (True, False), (False, False)):
        model.zero_grad()
        logps = answer_token_logps(model, collate(answers, packing, share, 0), 0.8)
        logps.sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (shared, shared_grads), *others = results
    assert shared.shape == (5 + 12 + 3 + 7 + 2,)
    for plain, grads in others:
        assert torch.allclose(shared, plain, rtol=1e-5, atol=1e-5), (kind, shared, plain)
        for name, grad in grads.items():
            assert (shared_grads[name] - grad).abs().max() / (grad.abs().max() + 1e-12) < 1e-4, (kind, name)


# -- learning ---------------------------------------------------------------------------------------


def grpo_config(folder, out, method, **settings):
    values = {
        "base_model": str(folder / "sft" / "final"), "dataset": str(folder / "words.jsonl"), "template": "chatml",
        "stage": "grpo", "method": method, "reward_function": str(folder / "reward.py") + ":thanks",
        "num_generations": 8, "micro_batch_size": 8, "gradient_accumulation_steps": 2, "max_new_tokens": 8,
        "learning_rate": 2e-3 if method == "lora" else 5e-4, "lr_scheduler": "constant", "max_steps": 16,
        "validation_split_ratio": 0.2, "eval_strategy": "steps", "eval_steps": 16, "per_device_eval_batch_size": 20,
        "logging_steps": 1, "seed": 0, "output_dir": str(out), "cache_dir": str(folder / "cache"), "plot_loss": False,
        "lora_r": 16, "lora_dropout": 0.0,
    }
    values.update(settings)
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    return resolved.config


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_grpo_raises_the_reward_of_fresh_answers(words_policy, tmp_path, method, loss):  # noqa: F811
    extra = {"scale_rewards": False} if loss == "dr_grpo" else {"epsilon_high": 0.28} if loss == "dapo" else {}
    result = train(grpo_config(words_policy, tmp_path / "run", method, grpo_loss=loss, **extra), quiet=True)
    records = read_metrics(result.run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_reward_mean" in r]
    assert [e["step"] for e in evals] == [0, 16]
    start, end = evals[0]["eval_reward_mean"], evals[-1]["eval_reward_mean"]
    assert end > start + 0.08, (start, end)  # the same held-out prompts, sampled from the same seeds
    steps = [r for r in records if "reward_mean" in r]
    for key in ("loss", "reward_std", "advantage_std", "equal_reward_groups", "completion_length", "truncated_share",
                "clip_ratio/low", "clip_ratio/high", f"rewards/{words_policy / 'reward.py'}:thanks/mean", "answers_per_second"):
        assert key in steps[-1], key
    shown = [json.loads(line) for line in (result.run_dir / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in shown} == set(range(1, 17)) and {"prompt", "completion", "rewards", "advantage"} <= set(shown[0])


def test_the_kl_to_the_reference_starts_at_zero_and_grows(words_policy, tmp_path):  # noqa: F811
    config = grpo_config(words_policy, tmp_path / "run", "lora", beta=0.04, max_steps=4, validation_split_ratio=0.0, eval_strategy="no")
    steps = [r for r in read_metrics(train(config, quiet=True).run_dir / "metrics.jsonl") if "reward_mean" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[-1]["kl"] > 1e-4  # the policy moved from the reference


def test_num_iterations_and_gspo_train_and_clip(words_policy, tmp_path):  # noqa: F811
    config = grpo_config(words_policy, tmp_path / "run", "full", num_iterations=2, importance_sampling_level="sequence", epsilon=4e-4,
                         max_steps=4, validation_split_ratio=0.0, eval_strategy="no", mask_truncated_completions=True)
    steps = [r for r in read_metrics(train(config, quiet=True).run_dir / "metrics.jsonl") if "reward_mean" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert any(r["clip_ratio/low"] + r["clip_ratio/high"] > 0 for r in steps)  # the second pass moves ratios past 1 +- 4e-4


def test_grpo_kill_and_resume_continue_the_same_curve(words_policy, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    settings = dict(max_steps=6, save_steps=2, validation_split_ratio=0.0, eval_strategy="no")
    straight = train(grpo_config(words_policy, tmp_path / "straight", "lora", **settings), quiet=True)

    class Killed(Exception):
        pass

    def kill_at_5(state):
        if state.global_step == 5:
            raise Killed

    config = grpo_config(words_policy, tmp_path / "killed", "lora", **settings)
    with pytest.raises(Killed):
        train(config, quiet=True, on_step=kill_at_5)
    resumed = train(config, resume="latest", quiet=True)
    curve = lambda run: [(r["step"], r["reward_mean"], r["loss"]) for r in read_metrics(run.run_dir / "metrics.jsonl")]  # noqa: E731
    assert curve(straight) == curve(resumed)
    a, b = (load_file(r.final_dir / "adapter_model.safetensors") for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight.run_dir / "completions.jsonl").read_text() == (resumed.run_dir / "completions.jsonl").read_text()


# -- rewards that need no code, and what is refused ---------------------------------------------------


def test_exact_match_and_format_rewards():
    from lmtune.stages.rl.rewards import ExactMatch, FormatReward

    answers = ["<think>2+2</think> it is 4", "so \\boxed{4.0}", "5", "nothing"]
    exact = ExactMatch("answer")([""] * 4, answers, [[]] * 4, {"answer": ["#### 4", "4", "4", "4"]})
    assert exact.tolist() == [1.0, 1.0, 0.0, 0.0]
    form = FormatReward(r"<think>.+?</think>\s*\S.*")([""] * 4, answers, [[]] * 4)
    assert form.tolist() == [1.0, 0.0, 0.0, 0.0]


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("settings,line", [
    ({"num_generations": 1}, "error: num_generations: 1 answer per prompt leaves no group"),
    ({"num_generations": 3, "micro_batch_size": 4}, "error: num_generations: a step trains micro_batch_size x gradient_accumulation_steps = 4"),
    ({"epsilon_high": 0.1}, "error: epsilon_high: 0.1 is below epsilon (0.2)"),
    ({"reward_weights": [1.0, 2.0]}, "error: reward_weights: 2 weights for 1 rewards"),
    ({"reward_function": None}, "error: reward_function: stage grpo needs a reward"),
    ({"reward_function": "missing.py:f"}, "error: reward_function: the file missing.py does not exist"),
])
def test_bad_grpo_settings_are_refused_at_check(tmp_path, capsys, settings, line):
    values = {"base_model": "builtin:tiny", "dataset": write(tmp_path, "p.jsonl", '{"prompt": "hi", "answer": "1"}\n'),
              "stage": "grpo", "reward_function": "exact_match", "num_generations": 4, "micro_batch_size": 4, **settings}
    config = tmp_path / "grpo.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    assert main(["check", str(config)]) == 1
    out = capsys.readouterr().out
    assert any(l.startswith(line) for l in out.splitlines()), out


def test_a_missing_reference_column_is_refused_at_check_naming_the_row(tmp_path, capsys):
    data = write(tmp_path, "p.jsonl", '{"prompt": "hi", "answer": "1"}\n{"prompt": "yo"}\n')
    config = tmp_path / "grpo.yaml"
    config.write_text(f"base_model: builtin:tiny\ndataset: {data}\nstage: grpo\nreward_function: exact_match\nnum_generations: 4\nmicro_batch_size: 4\n")
    assert main(["check", str(config)]) == 1
    assert "training row 2 has no `answer` column, which the exact_match reward compares against" in capsys.readouterr().out


@pytest.mark.parametrize("body,line", [
    ("def f(completions, **kw):\n    raise ValueError('boom')\n", "reward_function: {spec} raised ValueError: boom (on the prompts of rows"),
    ("def f(completions, **kw):\n    return [1.0]\n", "reward_function: {spec} returned 1 values for 8 answers"),
    ("def f(completions, **kw):\n    return [float('nan')] * len(completions)\n", "reward_function: {spec} returned nan for answer 1, the answer to the prompt of row"),
    ("def f(completions, **kw):\n    return ['good'] * len(completions)\n", "reward_function: {spec} must return a list of numbers"),
])
def test_a_bad_reward_stops_the_run_in_one_line_naming_it(tmp_path, capsys, body, line):
    spec = write(tmp_path, "reward.py", body) + ":f"
    rows = "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8))
    values = {"base_model": "builtin:tiny", "dataset": write(tmp_path, "p.jsonl", rows), "stage": "grpo", "reward_function": spec,
              "num_generations": 4, "micro_batch_size": 8, "max_new_tokens": 4, "max_steps": 3, "save_steps": 1,
              "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    config = tmp_path / "grpo.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(l.startswith("error: " + line.format(spec=spec)) for l in err.splitlines()), err


def test_a_prompt_longer_than_max_input_length_is_refused(tmp_path, capsys):
    rows = json.dumps({"prompt": "word " * 200}) + "\n" + json.dumps({"prompt": "short"}) + "\n"
    values = {"base_model": "builtin:tiny", "dataset": write(tmp_path, "p.jsonl", rows), "stage": "grpo", "reward_function": "format",
              "num_generations": 2, "micro_batch_size": 2, "max_input_length": 32, "output_dir": str(tmp_path / "run"),
              "cache_dir": str(tmp_path / "cache")}
    config = tmp_path / "grpo.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    assert main(["train", str(config)]) == 1
    assert "error: max_input_length: 1 prompts are longer than 32 tokens" in capsys.readouterr().err


def test_reward_functions_get_the_rows_columns(tmp_path):
    from lmtune.stages.rl.rewards import FunctionReward

    spec = write(tmp_path, "r.py", "def f(prompts, completions, answer, **kw):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
                 "def old(prompts, answers):\n    return [len(a) for a in answers]\n") + ":f"
    scores = FunctionReward(spec, None)(["p", "p"], ["1", "2"], [[], []], {"answer": ["1", "1"], "id": [5, 5]})
    assert scores.tolist() == [1.0, 0.0]
    positional = FunctionReward(spec.replace(":f", ":old"), None)(["p"], ["abc"], [[]], {"answer": ["x"]})
    assert positional.tolist() == [3.0]


def test_convert_reads_an_axolotl_grpo_config_and_check_accepts_it(tmp_path, capsys):
    """Axolotl's GRPO example (rl: grpo, a trl: block with vLLM keys, a transform dataset type), converted."""
    from conftest import FIXTURES

    source = tmp_path / "grpo.yml"
    source.write_text((FIXTURES / "axolotl_grpo.yml").read_text().replace("Qwen/Qwen2.5-1.5B-Instruct", "builtin:tiny")
                      .replace("openai/gsm8k", "gsm8k.jsonl").replace("chat_template: qwen_25\n", ""))
    (tmp_path / "rewards.py").write_text("def rand_reward_func(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    assert main(["convert", str(source), "-o", str(tmp_path / "ours.yaml")]) == 0
    out = capsys.readouterr().out
    assert "lmtune samples in the training process with its own KV-cache sampler" in out  # vllm: reported, with why
    assert "Axolotl's transform functions are not run" in out
    converted = resolve(str(tmp_path / "ours.yaml")).config.finetuning
    assert (converted.stage, converted.beta, converted.num_generations, converted.reward_function) == (
        "grpo", 0.001, 4, ["rewards.py:rand_reward_func"])
    assert resolve(str(tmp_path / "ours.yaml")).config.generation.max_new_tokens == 256
    assert main(["check", str(tmp_path / "ours.yaml")]) == 0, capsys.readouterr().out
