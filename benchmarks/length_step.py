"""One LoRA step (forward and backward) at uniform lengths: lmtune's loss against transformers' own.

    python benchmarks/length_step.py 1024 4096 8192     # writes the length section of RESULTS.md

The same 4-layer Llama (vocab 32,000, hidden 384), LoRA r16 on q, k, v, o, two examples of each length with
their first eighth untrained. lmtune: its packed attention, lean LoRA forward and summed head loss (gradients
in the forward, a chunk at a time); "checkpointed head": lmtune's earlier loss, each chunk's logits computed
again in the backward; transformers: `model(input_ids, attention_mask, labels).loss` on the padded batch (no
padding at one length). Medians of 3 alternated rounds; no optimizer step, so this isolates the model and loss.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from lmtune import losses
from lmtune.data.batches import packed_batch, pad_batch
from lmtune.model.packed_attention import use_packed_attention
from lmtune.model.lora_forward import use_lean_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=8192, pad_token_id=0)
def lora(m):
    return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
ours = lora(LlamaForCausalLM(cfg)); use_packed_attention(ours); use_lean_lora(ours)
theirs = lora(LlamaForCausalLM(cfg))
lines = ["## One LoRA step at uniform lengths, lmtune against transformers' own loss", "",
         "`benchmarks/length_step.py`: forward and backward of one micro batch of two examples, medians of 3 alternated "
         "rounds (no optimizer step).", "",
         "| tokens per example | lmtune s | lmtune, checkpointed head s | transformers s | lmtune / transformers speed |",
         "|---:|---:|---:|---:|---:|"]
for length in [int(a) for a in sys.argv[1:]] or [1024, 4096, 8192]:
    ex = [{"input_ids": torch.randint(1, 32000, (length,)).tolist()} for _ in range(2)]
    for e in ex: e["labels"] = [-100] * (length // 8) + e["input_ids"][length // 8:]
    packed, padded = packed_batch(ex), pad_batch(ex, 0)
    times = {"lmtune": [], "transformers": [], "lmtune checkpointed head": []}
    for r in range(3):
        for name in times:
            model = theirs if name == "transformers" else ours
            model.zero_grad(); t = time.perf_counter()
            if name == "transformers":
                loss = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]).loss
            elif name == "lmtune":
                loss = losses.summed_token_loss(model, packed)
            else:
                loss = losses.token_losses(model, packed)[0].sum()
            loss.backward(); times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines.append(f"| {length:,} | {med['lmtune']:.2f} | {med['lmtune checkpointed head']:.2f} | {med['transformers']:.2f} | "
                 f"**{med['transformers'] / med['lmtune']:.2f}x** |")
    print(lines[-1], flush=True)
write_section("length", "\n".join(lines))
