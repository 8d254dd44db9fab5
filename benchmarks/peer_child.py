"""One peer tool's training run, in that tool's own virtualenv (benchmarks/peers.py starts it).

    python peer_child.py TOOL JOB MODEL DATA OUT STEPS RESULT.json

The probe below counts every tool the same way: the non-padding tokens of each micro batch the Trainer
trains (an attention mask's non-zero entries, else every position of a padding-free row), the time of
each optimizer step's end, and the loss logged. Every peer but torchtune trains through transformers'
`Trainer`, so one patch of it serves them all; torchtune's recipe gets the same probe on its own methods.
Nothing here imports lmtune: the peers' venvs lack it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T0 = float(os.environ.get("PEER_T0", time.time()))  # when the parent started this process
LORA = dict(r=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
MAX_LEN = 1024
PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
MARKS: dict = {"tokens": 0, "steps": []}


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class HeldPeak:
    """The most memory malloc had handed out and not yet taken back (glibc's mallinfo2: heap blocks in use plus
    mapped blocks), sampled every 2 ms on a thread of its own: the live tensors' peak, without what the allocator
    keeps free for reuse. Beside the peak RSS it shows how much of that an allocator setting holds. Only with
    PEER_HELD set (peers.py --held), as the sampling slows the run it measures."""

    def __init__(self) -> None:
        import ctypes
        import threading

        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        self.libc, self.Info, self.peak = ctypes.CDLL("libc.so.6"), Info, 0
        self.libc.mallinfo2.restype = Info
        self.stop = threading.Event()
        if os.environ.get("PEER_HELD"):  # the sampler's wake-ups cost 8-10% of a step's speed on 2 cores: opt-in
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self.stop.wait(0.002):
            info = self.libc.mallinfo2()
            self.peak = max(self.peak, info.uordblks + info.hblkhd)

    def mb(self) -> float | None:
        self.stop.set()
        return self.peak / 2**20 if os.environ.get("PEER_HELD") else None


def install_probe() -> None:
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        MARKS["tokens"] += int((mask != 0).sum()) if mask is not None and mask.dim() == 2 else int(inputs["input_ids"].numel())
        return original(self, model, inputs, *args, **kwargs)

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            MARKS["steps"].append((time.time() - T0, MARKS["tokens"]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                MARKS["loss"] = float(logs["loss"])

    init = transformers.Trainer.__init__

    def with_probe(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Probe())

    transformers.Trainer.training_step = training_step
    transformers.Trainer.__init__ = with_probe


def common(job: str, steps: int) -> dict:
    return dict(max_steps=steps, learning_rate=2e-4 if job == "lora" else 5e-5, lr_scheduler_type="cosine", warmup_steps=0,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, dataloader_num_workers=0)


def trl(variant: str, job: str, model_dir: str, data: str, out: str, steps: int, recompute: bool) -> None:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_dataset("json", data_files=data, split="train")
    rows = rows.map(lambda r: {"prompt": PROMPT.format(instruction=r["instruction"]), "completion": r["output"]},
                    remove_columns=rows.column_names)
    # TRL refuses max_length without packing (it would not be enforced); every row here is under it
    settings = dict(packing=True, per_device_train_batch_size=1, max_length=MAX_LEN) if variant == "packing" else \
        dict(padding_free=True, per_device_train_batch_size=4, max_length=None)
    # TRL's own defaults are bf16 autocast and gradient checkpointing; the job is fp32, and recomputation is a
    # variant of its own (on: TRL's default, leanest; off: fastest)
    args = SFTConfig(output_dir=out, completion_only_loss=True, bf16=False, fp16=False, gradient_checkpointing=recompute,
                     **settings, **common(job, steps))
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"],
                      task_type="CAUSAL_LM") if job == "lora" else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft).train()


def axolotl(job: str, model_dir: str, data: str, out: str, steps: int) -> None:
    import yaml

    config = {
        "base_model": model_dir, "datasets": [{"path": data, "type": "alpaca", "ds_type": "json"}],
        "dataset_prepared_path": str(Path(out) / "prepared"), "output_dir": out, "sequence_len": MAX_LEN,
        "sample_packing": True, "pad_to_sequence_len": False, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
        "max_steps": steps, "optimizer": "adamw_torch", "lr_scheduler": "cosine", "learning_rate": common(job, steps)["learning_rate"],
        "warmup_steps": 0, "logging_steps": 1, "save_strategy": "no", "val_set_size": 0, "seed": 0, "fp32": True,
        "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False, "sdp_attention": True,
        "flash_attention": False, "dataloader_num_workers": 0, "use_cpu": True,
    }
    if job == "lora":
        config.update(adapter="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      lora_target_modules=LORA["targets"])
    path = Path(out) / "axolotl.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    from axolotl.cli.train import do_cli

    do_cli(config=str(path))


def llamafactory(job: str, model_dir: str, data: str, out: str, steps: int, recompute: bool) -> None:
    from llamafactory.train.tuner import run_exp

    folder = Path(data).parent
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": Path(data).name, "columns": {"prompt": "instruction", "response": "output"}}}))
    settings = common(job, steps)
    settings.pop("use_cpu")
    args = dict(stage="sft", do_train=True, model_name_or_path=model_dir, dataset="bench", dataset_dir=str(folder),
                template="alpaca", cutoff_len=MAX_LEN, packing=True, neat_packing=True, per_device_train_batch_size=1,
                gradient_accumulation_steps=1, output_dir=out, overwrite_output_dir=True, preprocessing_num_workers=1,
                finetuning_type="lora" if job == "lora" else "full", bf16=False, fp16=False,
                disable_gradient_checkpointing=not recompute, **settings)  # checkpointing on is LLaMA-Factory's default
    if job == "lora":
        args.update(lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_target=",".join(LORA["targets"]))
    run_exp(args)


class TorchtuneTokenizer:
    """torchtune's model transform over the benchmark model's tokenizer.json (torchtune ships none for a
    tokenizer built in code): each message's text tokenised without special tokens, the end-of-sequence id after
    the answer, masked where torchtune says (the prompt, as train_on_input is off)."""

    def __init__(self, path: str, max_seq_len: int, eos_id: int = 1) -> None:
        from tokenizers import Tokenizer

        self.tokenizer, self.max_seq_len, self.eos_id = Tokenizer.from_file(path), max_seq_len, eos_id
        self.pad_id = 0  # torchtune's PackedDataset pads with 0 whatever the tokenizer says; no text encodes to it

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        tokens: list = []
        mask: list = []
        for message in sample["messages"]:
            text = "".join(part["content"] for part in message.content) if not isinstance(message.content, str) else message.content
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids + ([self.eos_id] if message.role == "assistant" else [])
            tokens += ids
            mask += [message.masked] * len(ids)
        return {**sample, "tokens": tokens[: self.max_seq_len], "mask": mask[: self.max_seq_len]}


def torchtune(job: str, model_dir: str, data: str, out: str, steps: int, recompute: bool) -> None:
    """torchtune's own single-device recipe (LoRA or full), loaded from the wheel's recipes folder, packed."""
    import importlib.util

    import torchtune as package
    from omegaconf import OmegaConf

    hf = json.loads((Path(model_dir) / "config.json").read_text())  # torchtune's names for the benchmark model's shape
    shape = dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                 num_kv_heads=hf["num_key_value_heads"], embed_dim=hf["hidden_size"], max_seq_len=hf["max_position_embeddings"],
                 intermediate_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"], rope_base=hf["rope_parameters"]["rope_theta"])
    if job == "lora":
        model = dict(_component_="torchtune.models.llama3.lora_llama3", lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                     apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
                     lora_dropout=LORA["dropout"], **shape)
    else:
        model = dict(_component_="torchtune.models.llama3.llama3", **shape)
    cfg = OmegaConf.create({
        "output_dir": out, "model": model, "seed": 0, "shuffle": True, "batch_size": 1, "epochs": 1,
        "max_steps_per_epoch": steps, "gradient_accumulation_steps": 1, "compile": False, "device": "cpu", "dtype": "fp32",
        "tokenizer": {"_component_": "peer_child.TorchtuneTokenizer", "path": str(Path(model_dir) / "tokenizer.json"), "max_seq_len": MAX_LEN},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": model_dir,
                         "checkpoint_files": ["model.safetensors"], "model_type": "LLAMA3", "output_dir": out, "recipe_checkpoint": None},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True,
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json", "data_files": data,
                    "train_on_input": False, "packed": True, "split": "train"},
        # transformers' AdamW defaults, as the Trainer-based peers run
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": common(job, steps)["learning_rate"], "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}, "optimizer_in_bwd": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(Path(out) / "logs")},
        "log_every_n_steps": 1, "enable_activation_checkpointing": recompute, "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    })
    name = "lora_finetune_single_device" if job == "lora" else "full_finetune_single_device"
    path = Path(package.__file__).parent.parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe_class = next(v for k, v in vars(module).items() if k.endswith("RecipeSingleDevice"))
    recipe = recipe_class(cfg=cfg)
    recipe.setup(cfg=cfg)
    loss_step, scheduler_step, log_dict = recipe._loss_step, recipe._lr_scheduler.step, recipe._metric_logger.log_dict

    def counted_loss_step(batch):
        MARKS["tokens"] += int((batch["tokens"] != 0).sum())  # pack padding is id 0
        return loss_step(batch)

    def timed_scheduler_step(*args, **kwargs):  # right after each optimizer step
        scheduler_step(*args, **kwargs)
        MARKS["steps"].append((time.time() - T0, MARKS["tokens"]))

    def logged(values, step):
        MARKS["loss"] = float(values["loss"])
        return log_dict(values, step)

    recipe._loss_step, recipe._lr_scheduler.step, recipe._metric_logger.log_dict = counted_loss_step, timed_scheduler_step, logged
    recipe.train()
    recipe.cleanup()


def main() -> None:
    tool, job, model_dir, data, out, steps, result = sys.argv[1:8]
    steps = int(steps)
    held = HeldPeak()
    if not tool.startswith("torchtune"):
        install_probe()
    recompute = not tool.endswith("_fast")  # "_fast": the tool's setting without gradient checkpointing
    tool = tool.removesuffix("_fast")
    if tool.startswith("trl_"):
        trl(tool.removeprefix("trl_"), job, model_dir, data, out, steps, recompute)
    elif tool == "axolotl":
        axolotl(job, model_dir, data, out, steps)
    elif tool == "llamafactory":
        llamafactory(job, model_dir, data, out, steps, recompute)
    elif tool == "torchtune":
        torchtune(job, model_dir, data, out, steps, recompute)
    else:
        raise SystemExit(f"unknown tool {tool}")
    marks = MARKS["steps"]
    first, last = marks[0], marks[-1]
    Path(result).write_text(json.dumps({
        "first_step_s": first[0], "tokens_per_s": (last[1] - first[1]) / max(last[0] - first[0], 1e-9),
        "steps": len(marks), "peak_mb": peak_mb(), "held_peak_mb": held.mb(), "loss": MARKS.get("loss"),
    }))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # measured and written: no waiting on a tool's exit handlers (telemetry uploads, worker pools)


if __name__ == "__main__":
    main()
