"""`lmtune plan`: memory per device and time to finish, from the model's config.json alone (no weights, no torch).

Every figure is an estimate with its assumptions on the page:
- weights: trained weights in fp32 (autocast computes in bf16/fp16), frozen
  bases in the compute dtype, 4-bit (qlora) or 8-bit linear layers;
- gradients fp32 for trained weights; optimizer states per trained parameter
  (AdamW 8 bytes, 8-bit AdamW 2, SGD with momentum 4, ...);
- activations per token and layer for a decoder block (what autograd keeps
  in lmtune's forward, `kept_per_token_layer`), one block's worth plus block
  inputs with gradient checkpointing, attention scores only with eager
  attention, times the device's transient factor (backward temporaries and
  allocator; measured on CPU); every example counted at max_input_length
  (an upper bound);
- FSDP divides what it shards by the process count; a fixed framework
  overhead per device (CUDA context and allocator, or the Python process);
- time: 6 FLOPs per weight per token (4 for frozen weights, +2 with
  checkpointing) plus causal attention, at a stated share of the device's
  dense peak; on a CPU, this machine's measured peak plus the fixed costs of
  each pass and layer and of the optimizer update (measured, RESULTS.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config.method import trains_adapters
from .errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class Device:
    memory_gib: float
    peak_tflops_16: float  # dense bf16/fp16 tensor-core peak
    peak_tflops_32: float  # fp32 (tf32 tensor cores where the card has them: used with `tf32: true`)
    peak_tflops_tf32: float
    overhead_gib: float
    # Peak activation memory over what autograd keeps: the backward's temporaries, and what the allocator
    # holds on to. CUDA's caching allocator reuses its blocks; on CPU, glibc's heap keeps freed activation
    # memory and fragments it, and bitsandbytes' CPU kernels copy each quantised layer's input and weights.
    # The CPU figures are measured by benchmarks/plan_accuracy.py (RESULTS.md); the GPU one is a stated margin.
    transient: float = 1.2
    quantised_transient: float = 0.0


# Vendor datasheet dense peaks (no sparsity); CPU: a nominal 2-core figure, used only where numpy cannot measure this
# machine's (cpu_peak_tflops); --gpu-memory overrides the RAM figure.
DEVICES = {
    "b200": Device(180, 2250, 80, 1100, 2.0),
    "h200": Device(141, 989, 67, 494, 1.5),
    "h100": Device(80, 989, 67, 494, 1.5),
    "h100-nvl": Device(94, 835, 60, 418, 1.5),
    "h100-pcie": Device(80, 756, 51, 378, 1.5),
    "mi300x": Device(192, 1307, 163.4, 653.7, 2.0),
    "l40s": Device(48, 362, 91.6, 183, 1.0),
    # GeForce cards: bf16 with fp32 accumulation (what training uses) runs at half their fp16-accumulate rate.
    "rtx-5090": Device(32, 104.8, 104.8, 104.8, 1.0),
    "rtx-4090": Device(24, 82.6, 82.6, 82.6, 1.0),
    "a100-80g": Device(80, 312, 19.5, 156, 1.5),
    "a100-40g": Device(40, 312, 19.5, 156, 1.5),
    "l4": Device(24, 121, 30.3, 60, 1.0),
    "a10g": Device(24, 70, 31.2, 35, 1.0),
    "t4": Device(16, 65, 8.1, 8.1, 0.8),
    "cpu": Device(16, 0.18, 0.18, 0.18, 0.4, transient=2.1, quantised_transient=1.0),
}
UTILISATION = {"gpu": 0.40, "cpu": 0.60}  # share of the peak the matrix products of a step reach
# On a CPU the fixed costs of each pass matter as much as the matrix products for small models: measured by
# benchmarks/plan_accuracy.py (RESULTS.md) on the benchmark's 30M model and the builtin tiny and small ones.
CPU_PASS_S = 0.003  # per micro batch: the embedding, the loss, the Python around a forward and backward
CPU_LAYER_S = 0.002  # per decoder layer per micro batch: its kernels' dispatch and autograd's bookkeeping
CPU_ADAPTER_S = 0.0015  # per LoRA-adapted linear layer per micro batch: its two small products and dropout
CPU_UPDATE_BYTES_PER_S = 24e9  # the optimizer update streams each trained weight, its gradient and its states
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "olmo", "olmo2", "granite", "cohere",
         "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "glm4", "glm4_moe"}
# Model types whose RMS norms lmtune computes in one autograd function (model/rms_norm.py), keeping no normalised output.
FUSED_RMS_NORMS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite"}
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "adam": 8, "adamw_8bit": 2, "rmsprop": 4, "adafactor": 0.5}


class PlanError(UserError, ValueError):
    """A model whose config cannot be read, or a device that is not known."""


# -- the model ------------------------------------------------------------------------------------


@dataclass
class Experts:
    """A mixture of experts' feed-forward: routed experts (top_k of them per token), shared ones, and the first
    dense blocks that have an ordinary feed-forward instead."""

    count: int
    top_k: int
    intermediate: int
    shared_intermediate: int = 0  # all shared experts together (DeepSeek, GLM-4.5, Qwen2-MoE)
    dense_blocks: tuple[int, ...] = ()
    biases: bool = False  # GPT-OSS: expert and router biases

    def weights(self, hidden: int) -> int:
        return self.count * 3 * hidden * self.intermediate


@dataclass
class Latent:
    """DeepSeek's multi-head latent attention: queries and keys-values through low-rank projections."""

    q_rank: int  # 0: a full-rank q_proj
    kv_rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int


@dataclass
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    tied: bool
    qkv_bias: bool
    context: int
    model_type: str
    experts: Optional[Experts] = None
    latent: Optional[Latent] = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        heads, d = self.heads, self.hidden
        if self.latent is not None:
            a = self.latent
            qk = a.rope_dim + a.nope_dim
            q = {"q_a_proj": (d, a.q_rank), "q_b_proj": (a.q_rank, heads * qk)} if a.q_rank else {"q_proj": (d, heads * qk)}
            return {**q, "kv_a_proj_with_mqa": (d, a.kv_rank + a.rope_dim),
                    "kv_b_proj": (a.kv_rank, heads * (a.nope_dim + a.v_dim)), "o_proj": (heads * a.v_dim, d)}
        q = heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim), "o_proj": (q, d)}

    def feed_forward_linears(self, intermediate: int) -> dict[str, tuple[int, int]]:
        if self.gated:
            return {"gate_proj": (self.hidden, intermediate), "up_proj": (self.hidden, intermediate), "down_proj": (intermediate, self.hidden)}
        return {"up_proj": (self.hidden, intermediate), "down_proj": (intermediate, self.hidden)}

    def is_dense(self, block: int) -> bool:
        return self.experts is None or block in self.experts.dense_blocks

    def layer_linears(self, block: Optional[int] = None) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block (the last by default), by lmtune's target names; a mixture
        of experts' block lists its router and shared experts (the routed experts are 3-D weights apart)."""
        block = self.layers - 1 if block is None else block
        out = self.attention_linears()
        if self.is_dense(block):
            return {**out, **self.feed_forward_linears(self.intermediate)}
        e = self.experts
        out["router" if e.biases else "gate"] = (self.hidden, e.count)
        if e.shared_intermediate:
            out.update(self.feed_forward_linears(e.shared_intermediate))
        return out

    def block_parameters(self, block: int) -> int:
        linears = self.layer_linears(block)
        weights = sum(i * o for i, o in linears.values())
        attention = self.attention_linears()
        biases = (self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        if self.model_type == "gpt_neox":  # every linear layer has a bias, norms are LayerNorms (scale + bias)
            biases = sum(o for _, o in linears.values())
            return weights + biases + 4 * self.hidden
        if self.model_type == "gpt_oss":  # biases on every attention layer, attention sinks (one per head)
            biases = sum(o for _, o in attention.values()) + self.heads
        norms = 2 * self.hidden
        if self.model_type in ("gemma2", "gemma3_text", "glm4"):
            norms = 4 * self.hidden  # pre- and post-norms around attention and feed-forward
        if self.model_type in ("qwen3", "gemma3_text", "qwen3_moe"):
            norms += 2 * self.head_dim  # per-head q and k norms
        if self.latent is not None:
            norms += self.latent.kv_rank + self.latent.q_rank  # the low-rank projections' norms
        if not self.is_dense(block):
            e = self.experts
            weights += e.weights(self.hidden)
            if e.biases:  # each expert's gate_up and down biases, and the router's
                biases += e.count * (2 * e.intermediate + self.hidden) + e.count
        return weights + biases + norms

    def layer_parameters(self) -> int:
        """One block's parameters (the last: the one freeze trains first)."""
        return self.block_parameters(self.layers - 1)

    def parameters(self) -> int:
        embed = self.vocab * self.hidden
        final_norm = 2 * self.hidden if self.model_type == "gpt_neox" else self.hidden
        blocks = sum(self.block_parameters(block) for block in range(self.layers))
        return embed + (0 if self.tied else embed) + blocks + final_norm

    def active_parameters(self) -> int:
        """What one token computes with: every weight but the routed experts it is not sent to."""
        if self.experts is None:
            return self.parameters()
        e = self.experts
        sparse = sum(not self.is_dense(block) for block in range(self.layers))
        return self.parameters() - sparse * e.weights(self.hidden) * (e.count - e.top_k) // e.count


def _experts_of(text: dict[str, Any], hidden: int) -> Optional[Experts]:
    """The mixture of experts in a config, under each family's names; None for a dense model."""
    count = next((text[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if text.get(k)), 0)
    if count <= 1:
        return None
    layers = text["num_hidden_layers"]
    intermediate = text.get("moe_intermediate_size") or text.get("intermediate_size") or 4 * hidden
    shared = (text.get("n_shared_experts") or 0) * intermediate or (text.get("shared_expert_intermediate_size") or 0)
    dense = set(range(text.get("first_k_dense_replace") or 0)) | set(text.get("mlp_only_layers") or [])
    step = text.get("decoder_sparse_step") or 1
    dense |= {block for block in range(layers) if (block + 1) % step}
    return Experts(count, text.get("num_experts_per_tok") or 2, intermediate, shared, tuple(sorted(dense)),
                   biases=text.get("model_type") == "gpt_oss")


def _latent_of(text: dict[str, Any]) -> Optional[Latent]:
    if not text.get("kv_lora_rank"):
        return None
    return Latent(text.get("q_lora_rank") or 0, text["kv_lora_rank"], text.get("qk_rope_head_dim") or 0,
                  text.get("qk_nope_head_dim") or 0, text.get("v_head_dim") or 0)


def read_model_config(base_model: str) -> dict[str, Any]:
    """config.json of a builtin model, a local folder or a hub id (only that file is fetched)."""
    from .model.builtin import CONTEXT, PREFIX, SPECS, VOCAB_SIZE

    if base_model.startswith(PREFIX):
        size = base_model.removeprefix(PREFIX)
        if size not in SPECS:
            raise PlanError(f"base_model: no builtin model {base_model!r}")
        return {"model_type": "llama", "vocab_size": VOCAB_SIZE, "max_position_embeddings": CONTEXT, **SPECS[size]}
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.exists():
            raise PlanError(f"base_model: {base_model} has no config.json")
        return json.loads(path.read_text())
    if base_model.startswith((".", "/", "~")):
        raise PlanError(f"base_model: {base_model}: no such folder")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(base_model, "config.json")).read_text())
    except Exception as error:  # offline, unknown id, gated repository: one line either way
        raise PlanError(f"base_model: {base_model}: its config.json could not be read ({type(error).__name__})") from None


def shape_of(raw: dict[str, Any]) -> Shape:
    text = raw.get("text_config", raw)  # multimodal wrappers keep the language model's config inside
    model_type = text.get("model_type", raw.get("model_type", "llama"))
    missing = [k for k in ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers") if k not in text]
    if missing:
        raise PlanError(f"base_model: its config.json has no {', '.join(missing)}, so its size cannot be planned "
                        "(a model type with its own names for them)")
    hidden = text["hidden_size"]
    heads = text["num_attention_heads"]
    return Shape(
        vocab=text["vocab_size"],
        hidden=hidden,
        layers=text["num_hidden_layers"],
        heads=heads,
        kv_heads=heads if model_type == "gpt_neox" else (text.get("num_key_value_heads") or heads),  # no grouped heads
        head_dim=text.get("head_dim") or hidden // heads,
        intermediate=text.get("intermediate_size") or 4 * hidden,
        gated=model_type in GATED,
        tied=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", model_type in ("gemma", "gemma2", "gemma3_text")))),
        qkv_bias=bool(text.get("attention_bias", model_type == "qwen2")) and model_type != "gpt_oss",
        context=text.get("max_position_embeddings", 2048),
        model_type=model_type,
        experts=_experts_of(text, hidden),
        latent=_latent_of(text),
    )


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    device: str
    devices: int
    memory_per_device_gib: float
    parameters: int
    trainable_parameters: int
    micro_batch_size: int
    tokens_per_example: int
    bytes_per_device: dict[str, float]
    fits: bool
    largest_micro_batch: int
    tokens_per_second: float
    seconds: Optional[float]
    total_tokens: Optional[int]
    utilisation: float
    suggestions: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(self.bytes_per_device.values())


def _lora_targets(shape: Shape, targets: list[str]) -> list[str]:
    names = list(shape.layer_linears())
    chosen: list[str] = []
    for target in targets:
        if target in ("all", "all-linear"):
            chosen += [n for n in names if n not in ("gate", "router")]  # as training: routers are left alone
        elif target == "attention":
            chosen += list(shape.attention_linears())
        elif target in ("mlp", "ff"):
            chosen += [n for n in names if n in ("gate_proj", "up_proj", "down_proj")]
        elif target in names:
            chosen.append(target)
    return sorted(set(chosen))


def trainable_parameters(shape: Shape, config: Any) -> int:
    f = config.finetuning
    if f.method == "full":
        return shape.parameters()
    if f.method == "freeze":
        layers = min(abs(f.freeze_trainable_layers), shape.layers)
        return layers * shape.layer_parameters()
    linears = shape.layer_linears()
    per_layer = sum(f.lora_r * (linears[n][0] + linears[n][1]) for n in _lora_targets(shape, f.lora_target))
    return shape.layers * per_layer


def kept_per_token_layer(config: Any, shape: Shape, compute_bytes: int) -> float:
    """Bytes autograd keeps per token and decoder block in lmtune's forward (counted with saved-tensor hooks on
    the benchmark model): the block input and the two norm inputs in fp32, the normed inputs, q, k, v and the
    attention output; when the norms are trained (full, freeze) and not fused, their normalised outputs in
    fp32 too; gate and up of a gated feed-forward (lmtune recomputes the product when down_proj is a plain
    layer, else it is kept too); per LoRA target its r-wide intermediate, and with lora_dropout a one-byte
    mask over its input (on CPU the dropped elements' 8-byte indices, fewer bytes up to p = 1/8)."""
    f = config.finetuning
    d, inter, kv = shape.hidden, shape.intermediate, shape.kv_dim
    targets = _lora_targets(shape, f.lora_target) if trains_adapters(f.method) else []
    feed_forward = (2 if "down_proj" not in targets else 3) * inter if shape.gated else 2 * inter
    kept = 4 * 3 * d + compute_bytes * (4 * d + 2 * kv + feed_forward + f.lora_r * len(targets))
    if f.method in ("full", "freeze") and shape.model_type not in FUSED_RMS_NORMS:
        kept += 4 * 2 * d
    if targets and f.lora_dropout > 0:
        kept += sum(shape.layer_linears()[name][0] for name in targets)
    return kept


def estimate(config: Any, shape: Shape, device_name: str, devices: int, memory_gib: Optional[float] = None, micro_batch: Optional[int] = None,
             total_tokens: Optional[int] = None) -> Estimate:
    f, t, p, dist = config.finetuning, config.training, config.precision, config.distributed
    device = DEVICES[device_name]
    memory_gib = memory_gib or device.memory_gib
    half = p.precision in ("bf16", "fp16")
    compute_bytes = 2 if half else 4
    total, trainable = shape.parameters(), trainable_parameters(shape, config)
    linear_weights = shape.layers * sum(i * o for i, o in shape.layer_linears().values())

    # weights: trained in fp32; a frozen base in the compute dtype, its linear layers in 4 or 8 bits when quantised
    adapters = trains_adapters(f.method)
    if f.method in ("full", "freeze"):
        frozen = total - trainable
        weights = trainable * 4 + frozen * compute_bytes
    else:
        per_linear = 0.5 + 0.032 if f.method == "qlora" else (1.0 if f.int8_quantization else compute_bytes)
        weights = linear_weights * per_linear + (total - linear_weights) * compute_bytes + trainable * 4
    gradients = trainable * 4
    optimizer_bytes = (4 if t.momentum else 0) if t.optimizer == "sgd" else OPTIMIZER_BYTES.get(t.optimizer, 8)
    optimizer = trainable * optimizer_bytes
    shards = devices if dist.enable_fsdp and dist.fsdp_sharding_strategy != "no_shard" else 1
    if dist.enable_fsdp and not adapters:
        if dist.fsdp_sharding_strategy in ("full_shard", "hybrid_shard"):
            weights /= shards
        gradients /= shards
        optimizer /= shards
        if dist.fsdp_offload_params:
            weights, optimizer = weights / max(shape.layers, 1), 0.0  # one block's weights gathered on the device at a time

    # activations, per example of max_input_length tokens: what autograd keeps, times the device's transient factor
    tokens = _tokens_per_example(config, shape)
    per_token_layer = kept_per_token_layer(config, shape, compute_bytes)
    if config.model.attn_implementation == "eager":
        per_token_layer += compute_bytes * shape.heads * tokens  # the scores matrix, kept for softmax's backward
    if t.gradient_checkpointing:
        per_example = tokens * (shape.layers * compute_bytes * shape.hidden + per_token_layer)
    else:
        per_example = tokens * shape.layers * per_token_layer
    per_example *= device.transient + (device.quantised_transient if f.method == "qlora" or f.int8_quantization else 0.0)
    logits = min(tokens, 1024) * shape.vocab * 4 * 3  # one chunk of fp32 logits, their softmax and gradient
    static = weights + gradients + optimizer + device.overhead_gib * GIB + logits
    available = memory_gib * GIB
    batch = micro_batch or t.micro_batch_size
    activations = per_example * batch
    fits = static + activations <= available
    largest = max(0, int((available - static) // per_example)) if per_example else 0

    # time
    frozen_matmul = 4 if adapters or f.method == "freeze" else 6
    checkpoint_extra = 2 if t.gradient_checkpointing else 0
    trained_matmul = trainable if f.method != "full" else 0
    flops_per_token = (frozen_matmul + checkpoint_extra) * (shape.active_parameters() - trained_matmul) + (6 + checkpoint_extra) * trained_matmul
    flops_per_token += 12 * shape.layers * shape.hidden * tokens / 2  # causal attention over half the example on average
    if device_name == "cpu":
        peak, utilisation = cpu_peak_tflops(), UTILISATION["cpu"]
        micro_tokens = batch * tokens
        update = trainable * (4 + 4 + optimizer_bytes) * 2 / CPU_UPDATE_BYTES_PER_S / max(t.gradient_accumulation_steps, 1)
        adapted = shape.layers * len(_lora_targets(shape, f.lora_target)) if adapters else 0
        seconds_per_micro = (micro_tokens * flops_per_token / (peak * 1e12 * utilisation)
                             + CPU_PASS_S + CPU_LAYER_S * shape.layers + CPU_ADAPTER_S * adapted + update)
        tokens_per_second = devices * micro_tokens / seconds_per_micro
    else:
        peak = device.peak_tflops_16 if half else (device.peak_tflops_tf32 if p.tf32 else device.peak_tflops_32)
        utilisation = UTILISATION["gpu"]
        tokens_per_second = devices * peak * 1e12 * utilisation / flops_per_token
    seconds = total_tokens / tokens_per_second if total_tokens else None
    return Estimate(
        device=device_name, devices=devices, memory_per_device_gib=memory_gib, parameters=total, trainable_parameters=trainable,
        micro_batch_size=batch, tokens_per_example=tokens,
        bytes_per_device={"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
                          "logits": logits, "framework": device.overhead_gib * GIB},
        fits=fits, largest_micro_batch=largest, tokens_per_second=tokens_per_second, seconds=seconds, total_tokens=total_tokens,
        utilisation=utilisation,
    )


def cpu_peak_tflops() -> float:
    """This machine's fp32 matrix-product rate, measured once (a fifth of a second with numpy) and kept under
    $LMTUNE_HOME; a CPU's speed varies too much between machines for one figure to serve them all."""
    import platform

    home = Path(os.environ.get("LMTUNE_HOME", Path.home() / ".cache" / "lmtune"))
    key = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}"
    cache = home / "cpu-speed.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and known.get(f"{key} measurements", 0) >= 3:
        return float(known[key])
    try:
        import time

        import numpy as np
    except ImportError:
        return DEVICES["cpu"].peak_tflops_32
    size = 512
    a, b = np.ones((size, size), np.float32), np.ones((size, size), np.float32)
    a @ b  # the BLAS threads start
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - began) / 4)
    # A busy machine measures low: the fastest of the first three measurements is kept.
    rate = max(2 * size**3 / best / 1e12, float(known.get(key, 0.0)))
    try:
        home.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({**known, key: rate, f"{key} measurements": known.get(f"{key} measurements", 0) + 1}))
    except OSError:
        pass
    return rate


def _tokens_per_example(config: Any, shape: Shape) -> int:
    wanted = config.data.max_input_length
    return shape.context if wanted == -1 else min(wanted, shape.context)


def run_tokens(config: Any, tokens_per_example: int, devices: int, rows: Optional[int]) -> Optional[int]:
    """Tokens the run trains: max_steps x global batch, or epochs x rows, each example at its bound."""
    t = config.training
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * devices * tokens_per_example
    if t.max_steps > 0:
        return t.max_steps * per_step
    if rows:
        return int(t.epochs * rows * tokens_per_example)
    return None


def suggestions(config: Any, shape: Shape, device: str, devices: int, memory_gib: Optional[float]) -> list[str]:
    """Changes that make a run fit, each checked with the same estimate."""
    out = []
    f, t = config.finetuning, config.training

    def fits(**changes: dict[str, Any]) -> Optional[Estimate]:
        changed = config.model_copy(deep=True)
        for group, values in changes.items():
            setattr(changed, group, getattr(changed, group).model_copy(update=values))
        result = estimate(changed, shape, device, changes.get("_devices", devices), memory_gib)
        return result if result.fits else None

    if t.micro_batch_size > 1:
        for size in (t.micro_batch_size // 2, 1):
            if size >= 1 and fits(training={"micro_batch_size": size}):
                steps = t.gradient_accumulation_steps * t.micro_batch_size // size
                out.append(f"micro_batch_size: {size} with gradient_accumulation_steps: {steps} (the same global batch)")
                break
    if not t.gradient_checkpointing and fits(training={"gradient_checkpointing": True}):
        out.append("gradient_checkpointing: true (about a third more compute)")
    if f.method in ("full", "freeze") and fits(finetuning={"method": "lora"}):
        out.append("method: lora")
    if f.method in ("full", "freeze", "lora") and fits(finetuning={"method": "qlora"}):
        out.append("method: qlora (4-bit base; CUDA only)")
    if f.method in ("full", "freeze") and not config.distributed.enable_fsdp:
        for count in (2, 4, 8):
            changed = config.model_copy(deep=True)
            changed.distributed = changed.distributed.model_copy(update={"enable_fsdp": True})
            if estimate(changed, shape, device, count, memory_gib).fits:
                out.append(f"enable_fsdp: true on {count} devices")
                break
    if config.distributed.enable_fsdp and not config.distributed.fsdp_offload_params and fits(distributed={"fsdp_offload_params": True}):
        out.append("fsdp_offload_params: true (slower: weights and optimizer states live on the CPU)")
    return out


# -- the command ----------------------------------------------------------------------------------------


def make_plan(config: Any, device: str = "h100", devices: int = 1, memory_gib: Optional[float] = None, rows: Optional[int] = None) -> Estimate:
    if device not in DEVICES:
        raise PlanError(f"--gpu: {device} is not known; use one of {', '.join(DEVICES)}")
    shape = shape_of(read_model_config(config.model.base_model))
    first = estimate(config, shape, device, devices, memory_gib)
    total_tokens = run_tokens(config, first.tokens_per_example, devices, rows)
    result = estimate(config, shape, device, devices, memory_gib, total_tokens=total_tokens)
    if not result.fits:
        result.suggestions = suggestions(config, shape, device, devices, memory_gib)
    return result


def verdict(plan: Estimate) -> str:
    where = f"{plan.devices} x {plan.device} ({plan.memory_per_device_gib:.0f} GiB)"
    used = plan.peak_bytes / GIB
    speed = f"about {plan.tokens_per_second:,.0f} tokens/s"
    if plan.seconds is not None:
        speed += f", {_duration(plan.seconds)} for the run"
    if plan.fits:
        return (f"fits on {where}: {used:.1f} GiB per device at micro_batch_size {plan.micro_batch_size} "
                f"(largest that fits: {plan.largest_micro_batch}); {speed}")
    fix = "; ".join(plan.suggestions) if plan.suggestions else "a device with more memory"
    return f"does not fit on {where}: {used:.1f} GiB per device needed; what fits: {fix}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(plan: Estimate) -> str:
    lines = [
        f"model: {plan.parameters:,} parameters, {plan.trainable_parameters:,} trained",
        f"per device, micro batch {plan.micro_batch_size} of {plan.tokens_per_example} tokens (every example at max_input_length):",
    ]
    for name, value in plan.bytes_per_device.items():
        lines.append(f"  {name:12s} {value / GIB:8.2f} GiB")
    lines.append(f"  {'total':12s} {plan.peak_bytes / GIB:8.2f} GiB of {plan.memory_per_device_gib:.0f}")
    how = (f"this CPU's measured peak ({cpu_peak_tflops():.2f} TFLOP/s) at {plan.utilisation:.0%}, plus fixed costs per pass, "
           "layer and update" if plan.device == "cpu" else f"{plan.utilisation:.0%} of the device's dense peak")
    lines.append(f"time: {plan.tokens_per_second:,.0f} tokens/s ({how})"
                 + (f", {plan.total_tokens:,} tokens (an upper bound: every example at max_input_length): {_duration(plan.seconds)}"
                    if plan.seconds is not None else " (run length unknown: no max_steps and no local data to count)"))
    lines.append(f"plan: {verdict(plan)}")
    return "\n".join(lines)


def as_json(plan: Estimate) -> str:
    out = asdict(plan)
    out["peak_bytes_per_device"] = plan.peak_bytes
    return json.dumps(out, indent=2)


def parse_memory(text: str) -> float:
    """'80GiB', '80G', '40 GB' -> GiB."""
    cleaned = text.strip().lower().replace(" ", "")
    for suffix, scale in (("gib", 1.0), ("gb", 1e9 / GIB), ("g", 1.0), ("mib", 1 / 1024)):
        if cleaned.endswith(suffix):
            try:
                return float(cleaned.removesuffix(suffix)) * scale
            except ValueError:
                break
    try:
        return float(cleaned)
    except ValueError:
        raise PlanError(f"--gpu-memory: {text!r} is not a size; write it like 80GiB") from None


def cpu_memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None


def default_device() -> str:
    """The visible GPU's kind (by name and memory from nvidia-smi), else cpu; no torch."""
    import shutil
    import subprocess

    from .config.rules import cuda_visible

    if not cuda_visible() or shutil.which("nvidia-smi") is None:
        return "cpu" if not cuda_visible() else "h100"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "h100"
    name, memory = out.rsplit(",", 1)
    name = name.lower()
    for key in ("h100", "l4", "a10g", "t4"):
        if key in name.replace(" ", ""):
            return key
    if "a100" in name:
        return "a100-80g" if float(memory) > 50_000 else "a100-40g"
    return "h100"


def default_devices() -> int:
    return int(os.environ.get("SM_NUM_GPUS", "0") or 0) or 1


# -- the published rules of thumb, side by side (docs/planning.md) -------------------------------------

# config.json values of two 7-8B models (no download needed to print the table)
REFERENCE_MODELS = {
    "Llama-3.1-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "Mistral-7B-v0.1": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "max_position_embeddings": 32768, "tie_word_embeddings": False},
}
RULES = {
    "full": "16 bytes per parameter (bf16 mixed precision with fp32 master weights, gradients and AdamW's two states) + activations",
    "lora": "2 bytes per parameter for the bf16 base + a few hundred MB for adapters and their optimizer + activations",
    "qlora": "0.5-0.6 bytes per parameter for the 4-bit base (NF4 + block scales) + adapters + activations",
}


def rules_of_thumb() -> str:
    """A markdown table: plan's numbers for 7-8B models next to the published rules of thumb."""
    from .config.schema import Config

    lines = ["| model | method | parameters | weights + gradients + optimizer | bytes per parameter | "
             "peak on one H100, 1 x 2048 tokens, checkpointing | rule of thumb |",
             "|---|---|---|---|---|---|---|"]
    for name, raw in REFERENCE_MODELS.items():
        shape = shape_of(raw)
        for method in ("full", "lora", "qlora"):
            config = Config.model_validate({"finetuning": {"method": method, "lora_r": 16, "lora_target": ["all"]},
                                            "precision": {"precision": "bf16"}, "data": {"max_input_length": 2048},
                                            "training": {"gradient_checkpointing": True}})
            plan = estimate(config, shape, "h100", 1)
            static = sum(plan.bytes_per_device[k] for k in ("weights", "gradients", "optimizer"))
            if method == "qlora":  # the quantised linear layers alone, against the 0.5-0.6 rule
                linear = shape.layers * sum(i * o for i, o in shape.layer_linears().values())
                per = (0.5 + 0.032)
                shown = f"{per:.2f} (4-bit linear layers: {linear * per / GIB:.1f} GiB)"
            else:
                shown = f"{static / plan.parameters:.2f}"
            lines.append(f"| {name} | {method} | {plan.parameters / 1e9:.2f} B | {static / GIB:.1f} GiB | {shown} | "
                         f"{plan.peak_bytes / GIB:.1f} GiB | {RULES[method]} |")
    return "\n".join(lines)
