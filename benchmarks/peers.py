"""lmtune against the other fine-tuning tools at their best settings, on the same job, alternated.

    python benchmarks/peers.py                       # 3 rounds, LoRA and full, every peer that installs
    python benchmarks/peers.py --rounds 1 --tools lmtune trl_packing --jobs lora --look   # a quick look, not stored

The job: the ~27M-parameter Llama of benchmarks/run.py built in code, its 2,000 instruction rows in the same
order, LoRA r16 on q,k,v,o (or full fine-tuning), AdamW, cosine, fp32, rows of at most 1,024 tokens, 20 steps.
Each peer runs in a virtualenv of its own that this script makes (`.work/peers/venv-TOOL`, torch 2.13.0 and
the tool's release), through benchmarks/peer_child.py, which counts tokens the same way for every tool:
the non-padding tokens of every micro batch trained. Each run is a fresh process: start-to-first-step is
from its start, with the tool's caches emptied (cold) and filled (warm); peak memory is its high-water RSS,
and beside it the most memory malloc had handed out at once (live tensors, without what the allocator keeps
free). Medians of the rounds, with the order of the
tools rotated each round. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

WORK = HERE / ".work" / "peers"
RUNS = HERE / "results-peers.json"  # every run of every tool, by job
HELD = False  # --held: sample the peak held by malloc too
STEPS = 20
TORCHTUNE = "torchtune==0.6.1 torchao==0.10.0"
# tool -> (pip requirement, its setting in words). Every run is fp32 (TRL's own default is bf16 autocast). A tool
# whose default recomputes activations (gradient checkpointing: TRL, LLaMA-Factory) runs twice: at its default,
# the leanest, and as TOOL_fast without recomputation, the fastest. lmtune's variants run in this interpreter.
PEERS = {
    "axolotl": ("axolotl==0.19.0", "sample_packing: true, micro_batch_size 1"),
    "llamafactory": ("llamafactory==0.9.5", "neat_packing: true, batch 1 (its default gradient checkpointing)"),
    "llamafactory_fast": ("llamafactory==0.9.5", "neat_packing: true, batch 1, disable_gradient_checkpointing: true"),
    "trl_packing": ("trl==1.16.0 peft", "SFTTrainer packing=True, batch 1 (its default gradient checkpointing)"),
    "trl_packing_fast": ("trl==1.16.0 peft", "SFTTrainer packing=True, batch 1, gradient_checkpointing=False"),
    "trl_padding_free_fast": ("trl==1.16.0 peft", "SFTTrainer padding_free=True, 4 examples per step, gradient_checkpointing=False"),
    # torchtune 0.6.1 imports torchao.dtypes.nf4tensor, which later torchao releases moved: the release of its time
    "torchtune": (TORCHTUNE, "packed: True, batch_size 1, enable_activation_checkpointing: true (its configs' setting)"),
    "torchtune_fast": (TORCHTUNE, "packed: True, batch_size 1, enable_activation_checkpointing: false"),
}
LMTUNE = {
    "lmtune": "defaults (4 examples per step, no padding)",
    "lmtune_packed": "pack_to_length: true, micro_batch_size 1",
    "lmtune_packed_recompute": "pack_to_length: true, micro_batch_size 1, gradient_checkpointing: true",
}
# what two runs must share for their memory to be compared: the examples in a micro batch, and recomputation
LAYOUT = {"lmtune": "4 examples", "trl_padding_free_fast": "4 examples", "lmtune_packed": "1,024-token rows",
          "trl_packing_fast": "1,024-token rows", "axolotl": "1,024-token rows", "llamafactory_fast": "1,024-token rows",
          "lmtune_packed_recompute": "1,024-token rows, recomputed", "trl_packing": "1,024-token rows, recomputed",
          "llamafactory": "1,024-token rows, recomputed", "torchtune": "1,024-token rows, recomputed", "torchtune_fast": "1,024-token rows"}


def venv_for(tool: str) -> Path | None:
    """The tool's own virtualenv, made once; None (said) when the tool does not install here."""
    requirement = PEERS[tool][0]
    folder = WORK / f"venv-{requirement.split('==')[0]}"
    python = folder / "bin" / "python"
    if (folder / "ok").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0",
                           *requirement.split(), "pyyaml"], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{tool}: does not install here: {done.stderr.strip().splitlines()[-1][:300]}", flush=True)
        return None
    probe = [str(python), "-c", "import transformers.modeling_utils"]
    if subprocess.run(probe, capture_output=True).returncode != 0:  # a torchvision built for another torch breaks transformers
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], capture_output=True)
        # LLaMA-Factory imports torchaudio for audio data only, and torchaudio has no build for this torch: a stub
        # that refuses any use stands in (this job has no audio)
        site = next(folder.glob("lib/python*/site-packages"))
        (site / "torchaudio").mkdir(exist_ok=True)
        (site / "torchaudio" / "__init__.py").write_text(
            "def __getattr__(name):\n    raise ImportError('torchaudio: a stub (no build for this torch); no audio here')\n")
    (folder / "ok").write_text(subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout)
    return python


def versions(tool: str) -> str:
    """What the tool's virtualenv holds, in words (stored with each run, so a report can name the versions of runs
    whose virtualenv is not on this machine)."""
    folder = WORK / f"venv-{PEERS[tool][0].split('==')[0]}"
    frozen = dict(line.split("==", 1) for line in (folder / "ok").read_text().splitlines() if "==" in line)
    name = PEERS[tool][0].split("==")[0]
    beside = [f"{lib} {frozen[lib]}" for lib in ("torchao", "transformers") if lib in frozen]  # torchtune runs without transformers
    return ", ".join([f"{name} {frozen.get(name, '?')}", *beside, f"torch {frozen.get('torch', '?')}"])


def lmtune_child(variant: str, job: str, model: str, data: str, out: str, steps: int, result: str) -> None:
    """lmtune's run, timed as peer_child.py times the peers (in a fresh process of this interpreter)."""
    t0 = float(os.environ["PEER_T0"])
    from lmtune.config.load import resolve
    from lmtune.model.unused_imports import skip_bitsandbytes_unless_needed

    config = {
        "base_model": model, "dataset": data, "template": "alpaca", "max_input_length": 1024, "max_steps": steps,
        "method": "lora" if job == "lora" else "full", "learning_rate": 2e-4 if job == "lora" else 5e-5,
        "lr_scheduler": "cosine", "logging_steps": 1, "save_steps": 10 * steps, "output_dir": out, "overwrite_output_dir": True,
        "cache_dir": str(Path(out) / "cache"), "plot_loss": False, "seed": 0, "micro_batch_size": 4,
    }
    if variant.startswith("lmtune_packed"):
        config.update(pack_to_length=True, micro_batch_size=1, gradient_checkpointing=variant.endswith("_recompute"))
    if job == "lora":
        config.update(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target=["attention"])
    resolved = resolve(data=config)
    if resolved.config is None:
        raise SystemExit("; ".join(f"{p.key}: {p.message}" for p in resolved.errors))
    skip_bitsandbytes_unless_needed(resolved.config)
    from lmtune.engine.loop import train
    from peer_child import HeldPeak

    held = HeldPeak()

    marks = []
    result_of = train(resolved.config, quiet=True, on_step=lambda state: marks.append((time.time() - t0, state.real_tokens)))
    first, last = marks[0], marks[-1]
    peak = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    Path(result).write_text(json.dumps({
        "first_step_s": first[0], "tokens_per_s": (last[1] - first[1]) / max(last[0] - first[0], 1e-9),
        "steps": len(marks), "peak_mb": peak, "held_peak_mb": held.mb(), "loss": result_of.train_loss,
    }))


def one_run(tool: str, job: str, python: Path, model: Path, data: Path, steps: int, cold: bool = False) -> dict | None:
    """One run in a fresh process. Cold: the tool's caches emptied first (lmtune's tokenised data, the datasets
    cache TRL and LLaMA-Factory tokenise into, Axolotl's prepared dataset), so its start includes preparing the
    data; a warm run after it finds them filled."""
    out = WORK / "runs" / f"{tool}-{job}"
    result = out.with_suffix(".json")
    result.unlink(missing_ok=True)
    if cold:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PEER_T0": str(time.time()), **({"PEER_HELD": "1"} if HELD else {}), "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_CACHE": str(out / "hf-datasets"),
           "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1"}  # offline, Axolotl's telemetry retries at exit for minutes
    if tool in LMTUNE:
        command = [sys.executable, __file__, "--child", tool, job, str(model), str(data), str(out), str(steps), str(result)]
    else:
        command = [str(python), str(HERE / "peer_child.py"), tool, job, str(model), str(data), str(out), str(steps), str(result)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    if done.returncode != 0 or not result.exists():
        print(f"{tool} {job}{' (cold)' if cold else ''}: failed: {(done.stderr.strip() or done.stdout.strip())[-1500:]}", flush=True)
        return None
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--jobs", nargs="+", default=["lora", "full"])
    parser.add_argument("--tools", nargs="+", default=[*LMTUNE, *PEERS])
    parser.add_argument("--held", action="store_true", help="also sample the peak held by malloc (slows every run 8-10%%)")
    parser.add_argument("--look", action="store_true", help="print the report of these runs only; store nothing")
    parser.add_argument("--child", nargs=7)
    args = parser.parse_args()
    global HELD
    HELD = args.held
    if args.child:
        variant, job, model, data, out, steps, result = args.child
        lmtune_child(variant, job, model, data, out, int(steps), result)
        return
    from run import build_data, build_model

    model, data = WORK / "model", WORK / "data"
    build_model(model)
    build_data(data, 2000)
    pythons = {tool: (Path(sys.executable) if tool in LMTUNE else venv_for(tool)) for tool in args.tools}
    tools = [tool for tool in args.tools if pythons[tool] is not None]
    runs: dict = {}
    for round_number in range(args.rounds):
        order = tools[round_number % len(tools):] + tools[: round_number % len(tools)]
        for job in args.jobs:
            for tool in order:
                # a cold start first (2 steps: only its first one is timed), then the measured run on warm caches
                cold = one_run(tool, job, pythons[tool], model, data / "train.jsonl", 2, cold=True)
                got = one_run(tool, job, pythons[tool], model, data / "train.jsonl", args.steps)
                if got:
                    got["first_step_cold_s"] = cold["first_step_s"] if cold else None
                    if tool in PEERS:
                        got["versions"] = versions(tool)
                    runs.setdefault((job, tool), []).append(got)
                    print(f"round {round_number + 1} {job} {tool}: {got['tokens_per_s']:.0f} tok/s, {got['peak_mb']:.0f} MiB, "
                          f"first step {got['first_step_s']:.1f} s (cold {got['first_step_cold_s'] or float('nan'):.1f} s), loss {got['loss']}", flush=True)
    if args.look:
        print(report(runs, [t for t in [*LMTUNE, *PEERS] if any(key[1] == t for key in runs)], args))
        return
    # every run kept by (job, tool): a later call for some tools replaces theirs and reports beside the rest
    stored = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    stored.update({f"{job} {tool}": got for (job, tool), got in runs.items()})
    RUNS.write_text(json.dumps(stored, indent=1))
    every = {tuple(key.split(" ", 1)): got for key, got in stored.items()}
    shown = [t for t in [*LMTUNE, *PEERS] if any(key[1] == t for key in every)]
    write_section("peers", report(every, shown, args))


def report(runs: dict, tools: list[str], args: argparse.Namespace) -> str:
    lines = ["## Against the other tools at their best settings", "",
             f"`benchmarks/peers.py`: the ~27M-parameter Llama, 2,000 instruction rows, {args.steps} steps, fp32, rows of "
             f"at most 1,024 tokens, on this {os.cpu_count()}-core CPU; medians of {min(map(len, runs.values()))} rounds with the tools' "
             "order rotated; tokens are the non-padding tokens trained, counted the same way for every tool. Every run is fp32: "
             "TRL's SFTConfig defaults to bf16 autocast and, like "
             "LLaMA-Factory, to gradient checkpointing; a tool whose default recomputes runs both ways (`_fast`: without). "
             "Peak held by malloc (with `--held` only, as sampling it slows every run 8-10%): the most memory handed out at once "
             "(live tensors), sampled every 2 ms. Start to first step: from the process's start to the end of its first "
             "optimizer step; cold: each tool's caches emptied first (tokenised data, datasets cache, prepared dataset), in a "
             "2-step run just before the measured one, which finds them filled (warm).", ""]
    for requirement in dict.fromkeys(PEERS[t][0] for t in tools if t in PEERS):
        ran = [g for (_, t), got in runs.items() if PEERS.get(t, ("",))[0] == requirement for g in got]
        recorded = next((g["versions"] for g in reversed(ran) if "versions" in g), None)
        lines.append(f"- {recorded or versions(next(t for t in tools if PEERS.get(t, ('',))[0] == requirement))}")
    for job in args.jobs:
        lines += ["", f"### {'LoRA r16 on q,k,v,o' if job == 'lora' else 'full fine-tuning'}", "",
                  "| tool, setting | layout | tokens/s | peak RSS MiB | peak held by malloc MiB | start to first step s, warm | cold | loss at the end |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        medians = {}
        for tool in tools:
            got = runs.get((job, tool))
            if not got:
                continue
            medians[tool] = {k: statistics.median(g.get(k) or float("nan") for g in got) for k in ("tokens_per_s", "peak_mb", "held_peak_mb", "first_step_s", "first_step_cold_s")}
            medians[tool]["loss"] = statistics.median(g["loss"] for g in got if g["loss"] is not None) if any(g["loss"] is not None for g in got) else float("nan")
            m = medians[tool]
            held = "-" if m["held_peak_mb"] != m["held_peak_mb"] else f"{m['held_peak_mb']:,.0f}"  # nan: not sampled
            lines.append(f"| {tool}: {(LMTUNE | {k: v[1] for k, v in PEERS.items()})[tool]} | {LAYOUT[tool]} | "
                         f"{m['tokens_per_s']:,.0f} | {m['peak_mb']:,.0f} | {held} | {m['first_step_s']:.1f} | {m['first_step_cold_s']:.1f} | {m['loss']:.3f} |")
        peers = {t: m for t, m in medians.items() if t in PEERS}
        if peers and "lmtune" in medians:
            fastest = max(peers, key=lambda t: peers[t]["tokens_per_s"])
            quick = {f"{m}_s": min(peers, key=lambda t, m=m: peers[t][f"{m}_s"]) for m in ("first_step", "first_step_cold")}
            starts = "; ".join(f"start to first step{' (cold caches)' if 'cold' in key else ''} "
                               f"{medians['lmtune'][key] / peers[t][key]:.2f}x {t}'s" for key, t in quick.items())
            ours = medians["lmtune"]
            lines += ["", f"lmtune defaults against the best peer: {ours['tokens_per_s'] / peers[fastest]['tokens_per_s']:.2f}x "
                      f"the tokens/s of {fastest}, start to first step {ours['first_step_s'] / peers[fastest]['first_step_s']:.2f}x "
                      f"its warm and {ours['first_step_cold_s'] / peers[fastest]['first_step_cold_s']:.2f}x its cold; "
                      f"against the quickest peer to start: {starts}."]
            for ours, layout in ((t, LAYOUT[t]) for t in LMTUNE):
                same = {t: m for t, m in peers.items() if LAYOUT[t] == layout}
                if ours in medians and same:
                    leanest = min(same, key=lambda t: same[t]["peak_mb"])
                    lines.append(f"Peak memory at the same layout ({layout}): {ours} {medians[ours]['peak_mb']:,.0f} MiB, "
                                 f"{medians[ours]['peak_mb'] / same[leanest]['peak_mb']:.2f}x the leanest peer ({leanest}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
