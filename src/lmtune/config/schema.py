"""Every setting lmtune understands, one pydantic model per concern.

A config file is flat (``learning_rate: 2e-4``, as in JumpStart, Axolotl and
LLaMA-Factory); each flat key belongs to exactly one group below, so code reads
``cfg.training.learning_rate``. Each field carries its own documentation and its
names in the other tools, so ``explain``, the alias table and
``docs/configuration.md`` all come from this one file.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .fields import TOOLS, Group, setting, split_commas  # noqa: F401  (TOOLS: read by aliases and docs)

class ModelArgs(Group):
    base_model: Optional[str] = setting(
        None,
        "The model to fine-tune: a local folder in Hugging Face format, a hub id "
        "such as `meta-llama/Llama-3.1-8B`, or `builtin:tiny` for the small "
        "offline model lmtune builds itself.",
        jumpstart=("model_id",),
        axolotl=("base_model",),
        llamafactory=("model_name_or_path",),
    )
    tokenizer: Optional[str] = setting(
        None,
        "Where to load the tokenizer from, when it is not beside the model.",
        axolotl=("tokenizer_config",),
        llamafactory=("tokenizer_name_or_path",),
    )
    model_revision: Optional[str] = setting(
        None,
        "The hub branch, tag or commit of the model, for reproducible runs.",
        axolotl=("revision_of_model",),
        llamafactory=("model_revision",),
    )
    trust_remote_code: bool = setting(
        False,
        "Allow the model's repository to run its own Python code while loading. "
        "Off unless you trust the source: the code runs with your permissions.",
        axolotl=("trust_remote_code",),
        llamafactory=("trust_remote_code",),
    )
    allow_pickle_weights: bool = setting(
        False,
        "Load pickle (`.bin`) weights when a model has no safetensors. Pickle files "
        "can run code when loaded: only for files you trust.",
    )
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2", "flex_attention"]] = setting(
        None,
        "The attention kernel. Unset picks the fastest one that is correct for "
        "the run (SDPA with a block-diagonal mask when packing).",
        llamafactory=("flash_attn",),
    )


class FinetuningBase(Group):
    """The method's settings; `FinetuningArgs` below puts `stage` before them and every stage's own settings after."""

    method: Literal["full", "freeze", "lora", "qlora"] = setting(
        "lora",
        "Which weights change: `full` all of them, `freeze` only chosen layers "
        "or modules, `lora` small low-rank adapters beside a frozen base, "
        "`qlora` LoRA on a 4-bit quantised base.",
        llamafactory=("finetuning_type",),
    )
    freeze_trainable_layers: int = setting(
        2,
        "With `method: freeze`: how many transformer layers are trained, counted "
        "from the last (a negative number counts from the first).",
        more="More layers train: closer to full fine-tuning, more memory.",
        less="Fewer layers train: less memory, less capacity to adapt.",
        llamafactory=("freeze_trainable_layers",),
    )
    freeze_trainable_modules: list[str] = setting(
        ["all"],
        "With `method: freeze`: which modules inside the trainable layers are "
        "trained (`all`, or names such as `mlp`, `self_attn`).",
        llamafactory=("freeze_trainable_modules",),
    )
    freeze_extra_modules: list[str] = setting(
        [],
        "With `method: freeze`: modules outside the layers to train too, such as "
        "`embed_tokens` or `lm_head`.",
        llamafactory=("freeze_extra_modules",),
    )
    lora_r: int = setting(
        8,
        "The rank of each LoRA adapter: how many directions of change it can learn.",
        more="More capacity and more trainable parameters; past 64 rarely helps.",
        less="Fewer parameters and less memory; below 4 the adapter may underfit.",
        ge=1,
        jumpstart=("lora_r",),
        axolotl=("lora_r",),
        llamafactory=("lora_rank",),
        torchtune=("lora_rank",),
    )
    lora_alpha: Optional[float] = setting(
        None,
        "The LoRA scale numerator: the adapter's update is multiplied by "
        "`lora_alpha / lora_r`. Unset means twice `lora_r`.",
        more="Larger steps from the adapter, as if the learning rate were higher.",
        less="Smaller adapter steps.",
        gt=0,
        jumpstart=("lora_alpha",),
        axolotl=("lora_alpha",),
        llamafactory=("lora_alpha",),
        torchtune=("lora_alpha",),
    )
    lora_dropout: float = setting(
        0.05,
        "Dropout on the adapter's input during training.",
        more="Stronger regularisation; helps small datasets, slows learning.",
        less="Weaker regularisation; 0 turns it off.",
        ge=0.0,
        lt=1.0,
        jumpstart=("lora_dropout",),
        axolotl=("lora_dropout",),
        llamafactory=("lora_dropout",),
        torchtune=("lora_dropout",),
    )
    lora_target: list[str] = setting(
        ["all"],
        "Which linear layers get adapters: module names (`q_proj,v_proj`) or the "
        "groups `attention` (q/k/v/o projections), `mlp` or `ff` (feed-forward "
        "projections) and `all` (every linear layer but the output head).",
        axolotl=("lora_target_modules",),
        llamafactory=("lora_target",),
        torchtune=("lora_attn_modules",),
    )
    lora_modules_to_save: list[str] = setting(
        [],
        "Modules trained in full and saved beside the adapter (for example "
        "`embed_tokens`, `lm_head` when new tokens are added).",
        axolotl=("lora_modules_to_save",),
        llamafactory=("additional_target",),
    )
    int8_quantization: bool = setting(
        False,
        "Load the frozen base in 8-bit (bitsandbytes LLM.int8) under LoRA "
        "adapters, halving its memory against bf16.",
        jumpstart=("int8_quantization",),
        axolotl=("load_in_8bit",),
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = setting(
        "nf4",
        "With `method: qlora`: the 4-bit number format of the base. NF4 fits "
        "normally distributed weights and is the usual choice.",
        llamafactory=("quantization_type",),
    )
    bnb_4bit_double_quant: bool = setting(
        True,
        "With `method: qlora`: also quantise the quantisation constants, saving "
        "about 0.4 bits per parameter.",
        llamafactory=("double_quantization",),
    )


def _with_stages(base: type[Group]) -> type[Group]:
    """The finetuning group: `stage`, whose values and words come from the stage registry, the method's
    settings, and each stage's own settings, under their flat keys."""
    from pydantic import create_model

    from ..stages import STAGES

    names = tuple(STAGES)
    fields: dict[str, Any] = {
        "stage": (
            Literal[names],  # type: ignore[valid-type]
            setting("sft", "What is trained: " + "; ".join(f"`{n}` {s.summary}" for n, s in STAGES.items()) + ".",
                    llamafactory=("stage",)),
        ),
        **{key: (info.annotation, info) for key, info in base.model_fields.items()},
    }
    for stage in STAGES.values():
        for key, info in (stage.settings.model_fields.items() if stage.settings else ()):
            if key in fields:
                continue  # a stage's settings may be another's (`also_uses`), declared once
            fields[key] = (info.annotation, info)
    lists = field_validator(
        "lora_target", "lora_modules_to_save", "freeze_trainable_modules", "freeze_extra_modules", mode="before"
    )(split_commas)
    return create_model("FinetuningArgs", __base__=Group, __module__=__name__, __validators__={"_lists": lists}, **fields)


FinetuningArgs = _with_stages(FinetuningBase)


DatasetFormat = Literal["auto", "text", "instruction", "chat", "preference", "prompt", "unpaired"]


class DatasetSpec(Group):
    """One dataset of a run, when a plain path is not enough."""

    path: str
    format: DatasetFormat = "auto"
    columns: dict[str, str] = {}
    weight: Optional[float] = Field(None, gt=0)
    split: str = "train"


class DataArgs(Group):
    dataset: list[Union[str, DatasetSpec]] = setting(
        [],
        "Training data: files (`.json`, `.jsonl`, `.csv`, `.parquet`, `.txt`), "
        "folders of them, a `datasets.save_to_disk` folder or a hub dataset id; "
        "several at once as a list.",
        axolotl=("datasets",),
        llamafactory=("dataset",),
    )
    validation_dataset: list[Union[str, DatasetSpec]] = setting(
        [],
        "Validation data, in the same forms as `dataset`. When empty, "
        "`validation_split_ratio` carves it out of the training data.",
        axolotl=("test_datasets",),
        llamafactory=("eval_dataset",),
    )
    dataset_dir: Optional[str] = setting(
        None,
        "Folder that relative dataset paths are read from.",
        llamafactory=("dataset_dir",),
    )
    dataset_format: DatasetFormat = setting(
        "auto",
        "How rows are read: `text`, `instruction` (alpaca), `chat` (messages or "
        "ShareGPT), `preference` (prompt/chosen/rejected), `unpaired` (prompt/"
        "completion/label, for kto) or `prompt`; `auto` "
        "detects it from the columns.",
    )
    dataset_columns: dict[str, str] = setting(
        {},
        "Column renames for odd data, as `{lmtune_name: your_column}` (for "
        "example `{instruction: question, output: answer}`).",
        llamafactory=("columns",),
    )
    dataset_weights: list[float] = setting(
        [],
        "Mixing weights when several datasets are given, one per dataset.",
        llamafactory=("interleave_probs",),
    )
    streaming: bool = setting(
        False,
        "Read and tokenise training rows as training reaches them, in file order, instead of tokenising "
        "every row up to front into the cache: for hub datasets and files too large to tokenise first. "
        "Needs `max_steps` (a stream's length is not known); the first `max_val_samples` rows validate; "
        "several datasets interleave row by row by `dataset_weights`; a resumed run continues at the same "
        "example. Rows are not shuffled: shuffle the file first.",
        more="No tokenising before the first step and no cache on disk; the rows train in file order.",
        axolotl=("streaming",),
        llamafactory=("streaming",),
    )
    template: Optional[str] = setting(
        None,
        "The chat format: a family's name (`llama3`, `qwen3`, `gemma`, `phi4`, `deepseek-r1`, ... as "
        "LLaMA-Factory and Axolotl write them; `lmtune explain template` lists them all), or unset for the "
        "tokenizer's own chat template. The saved tokenizer carries the format that was trained.",
        axolotl=("chat_template",),
        llamafactory=("template",),
    )
    train_on_reasoning: bool = setting(
        True,
        "Learn an answer's reasoning (`reasoning_content`, or a `<think>` block) along with its text; "
        "false trains the text only.",
    )
    enable_thinking: Optional[bool] = setting(
        None,
        "Passed to templates that switch thinking on and off (Qwen3, Nemotron): false renders each answer "
        "in the thinking-off prompt. Unset: the template's own default.",
        llamafactory=("enable_thinking",),
    )
    chat_dataset: bool = setting(
        False,
        "JumpStart: the training rows are dialogs (`dialog` lists of role/content turns).",
        jumpstart=("chat_dataset",),
    )
    instruction_tuned: bool = setting(
        False,
        "JumpStart: the training rows are instructions rendered through the "
        "`template.json` found beside the data.",
        jumpstart=("instruction_tuned",),
    )
    add_input_output_demarcation_key: bool = setting(
        False,
        "Put explicit markers between the prompt and the response of instruction "
        "data, so the model sees exactly where its answer starts.",
        jumpstart=("add_input_output_demarcation_key",),
    )
    train_on_inputs: bool = setting(
        False,
        "Also learn from the prompt tokens, not only from the responses.",
        axolotl=("train_on_inputs",),
        llamafactory=("train_on_prompt",),
    )
    max_input_length: int = setting(
        -1,
        "Longest tokenised example, in tokens; -1 means the model's context length.",
        more="Longer examples fit whole; memory and time per step grow with it.",
        less="Less memory per step; more examples are truncated or dropped.",
        ge=-1,
        jumpstart=("max_input_length",),
        axolotl=("sequence_len",),
        llamafactory=("cutoff_len",),
        torchtune=("max_seq_len",),
    )
    truncation: Literal["keep_response", "truncate_end", "drop"] = setting(
        "keep_response",
        "What happens to an example longer than `max_input_length`: "
        "`keep_response` cuts the prompt from the left and keeps the answer, "
        "`truncate_end` cuts the end, `drop` leaves the example out (counted).",
    )
    max_train_samples: int = setting(
        -1,
        "Use at most this many training examples (after the split); -1 means all.",
        ge=-1,
        jumpstart=("max_train_samples",),
        llamafactory=("max_samples",),
    )
    max_val_samples: int = setting(
        -1,
        "Use at most this many validation examples; -1 means all.",
        ge=-1,
        jumpstart=("max_val_samples",),
    )
    validation_split_ratio: float = setting(
        0.0,
        "Fraction of the training rows held out for validation when no "
        "`validation_dataset` is given; 0 holds out none.",
        more="A steadier validation loss, fewer rows to train on.",
        less="More training rows, a noisier validation loss.",
        ge=0.0,
        lt=1.0,
        jumpstart=("validation_split_ratio",),
        axolotl=("val_set_size",),
        llamafactory=("val_size",),
    )
    train_data_split_seed: int = setting(
        0,
        "Seed of the train/validation split alone, so the split stays the same "
        "when the training seed changes.",
        jumpstart=("train_data_split_seed",),
    )
    preprocessing_num_workers: Optional[int] = setting(
        None,
        "Processes that tokenise the data; unset means one per CPU core (at most 8) for 20,000 rows or more, "
        "one below that (starting a worker costs more than it saves on small data).",
        ge=1,
        jumpstart=("preprocessing_num_workers",),
        axolotl=("dataset_processes",),
        llamafactory=("preprocessing_num_workers",),
    )
    overwrite_cache: bool = setting(
        False,
        "Rebuild the tokenised-data cache even when a matching one exists.",
        llamafactory=("overwrite_cache",),
    )
    cache_dir: Optional[str] = setting(
        None,
        "Where tokenised data is cached; unset means `.lmtune-cache` in the current folder.",
        axolotl=("dataset_prepared_path",),
        llamafactory=("tokenized_path",),
    )
    packing: Optional[bool] = setting(
        None,
        "Lay each micro batch out as one padding-free row, each example attending only to "
        "itself, so no compute or memory goes to padding. The examples and the loss are the "
        "same as with padded batches. Unset means on wherever the model's attention can be "
        "kept exact per example (off with a note otherwise); true insists (an error where it "
        "cannot be exact); false pads each batch to its longest example.",
    )
    pack_to_length: bool = setting(
        False,
        "Gather examples into rows of up to `max_input_length` tokens, as many whole examples "
        "per row as fit, and make `micro_batch_size` count rows instead of examples: short "
        "examples then train many to a step. Each example still attends only to itself, with "
        "its positions restarting, and the loss stays normalised per trained token. This is "
        "what Axolotl's sample_packing, LLaMA-Factory's neat_packing and torchtune's packed do; "
        "pt and sft only. Off by default, though leaner: on benchmarks/peers.py's job, rows of 1,024 "
        "tokens peaked about 30% lower than the default micro batches of 4 examples at about their speed, "
        "but the examples in a step then vary with their lengths, so a step, its learning rate and the "
        "steps in an epoch mean something else than in the same config without it (Axolotl, "
        "LLaMA-Factory and TRL do not pack by default either).",
        more="More examples per step and fewer steps per epoch; set max_input_length to the row length you want.",
        axolotl=("sample_packing",),
        llamafactory=("neat_packing",),
        torchtune=("packed",),
    )
    group_by_length: bool = setting(
        False,
        "Batch examples of similar length together to reduce padding.",
        axolotl=("group_by_length",),
    )

    _lists = field_validator("dataset", "validation_dataset", mode="before")(split_commas)


Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adam", "sgd", "rmsprop", "adafactor", "adamw_8bit"]
Scheduler = Literal["cosine", "linear", "polynomial", "constant", "constant_with_warmup", "cosine_with_restarts"]


class TrainingArgs(Group):
    epochs: float = setting(
        1.0,
        "Passes over the training data (ignored when `max_steps` is set).",
        more="More passes; past a few, small datasets start to be memorised.",
        less="Fewer passes; fractions train on part of an epoch.",
        gt=0,
        jumpstart=("epoch",),
        axolotl=("num_epochs",),
        llamafactory=("num_train_epochs",),
        torchtune=("epochs",),
    )
    max_steps: int = setting(
        -1,
        "Stop after this many optimizer steps; -1 means run for `epochs`.",
        ge=-1,
        axolotl=("max_steps",),
        llamafactory=("max_steps",),
        torchtune=("max_steps_per_epoch",),
    )
    learning_rate: float = setting(
        1e-4,
        "Peak step size of the optimizer.",
        more="Faster learning, until the loss becomes unstable or diverges.",
        less="Steadier but slower learning; too small and nothing moves.",
        jumpstart=("learning_rate",),
        axolotl=("learning_rate",),
        llamafactory=("learning_rate",),
        torchtune=("lr",),
    )
    micro_batch_size: int = setting(
        1,
        "Examples per forward/backward pass on each device.",
        more="Better use of the hardware, more memory per step.",
        less="Less memory; use `gradient_accumulation_steps` to keep the batch size.",
        ge=1,
        jumpstart=("per_device_train_batch_size",),
        axolotl=("micro_batch_size",),
        llamafactory=("per_device_train_batch_size",),
        torchtune=("batch_size",),
    )
    gradient_accumulation_steps: int = setting(
        1,
        "Micro batches whose gradients add up to one optimizer step. The loss is "
        "normalised over the tokens of the whole accumulated batch.",
        more="A larger effective batch without more memory; fewer steps per epoch.",
        less="More, noisier optimizer steps.",
        ge=1,
        jumpstart=("gradient_accumulation_steps",),
        axolotl=("gradient_accumulation_steps",),
        llamafactory=("gradient_accumulation_steps",),
        torchtune=("gradient_accumulation_steps",),
    )
    optimizer: Optimizer = setting(
        "adamw_torch",
        "The optimizer: `adamw_torch` (AdamW), `adamw_torch_fused` (the fused "
        "CUDA kernel), `adam`, `sgd`, `rmsprop`, `adafactor`, `adamw_8bit` "
        "(bitsandbytes, 8-bit states).",
        axolotl=("optimizer",),
        llamafactory=("optim",),
    )
    adam_beta1: float = setting(
        0.9,
        "Adam's first-moment decay: how long the running mean of gradients remembers.",
        more="Smoother, slower-reacting steps.",
        less="Steps follow recent gradients more closely.",
        ge=0.0,
        lt=1.0,
        axolotl=("adam_beta1",),
        llamafactory=("adam_beta1",),
    )
    adam_beta2: float = setting(
        0.999,
        "Adam's second-moment decay: how long the running gradient scale remembers.",
        more="A steadier scale estimate; slow to react to gradient spikes.",
        less="The scale forgets faster; large-model recipes use 0.95 for stability.",
        ge=0.0,
        lt=1.0,
        axolotl=("adam_beta2",),
        llamafactory=("adam_beta2",),
    )
    adam_epsilon: float = setting(
        1e-8,
        "Added to Adam's denominator to avoid division by tiny numbers.",
        more="Damps steps of parameters with tiny gradients; very large values make Adam behave like SGD.",
        less="Closer to pure Adam; too small can be unstable in fp16.",
        gt=0.0,
        axolotl=("adam_epsilon",),
        llamafactory=("adam_epsilon",),
    )
    weight_decay: float = setting(
        0.0,
        "Decoupled weight decay: pulls weights towards zero each step.",
        more="Stronger regularisation.",
        less="Weaker regularisation; 0 turns it off.",
        ge=0.0,
        jumpstart=("weight_decay",),
        axolotl=("weight_decay",),
        llamafactory=("weight_decay",),
        torchtune=("weight_decay",),
    )
    momentum: float = setting(
        0.0,
        "With `sgd` or `rmsprop`: the momentum factor.",
        ge=0.0,
        lt=1.0,
    )
    nesterov: bool = setting(False, "With `sgd`: use Nesterov momentum (needs `momentum` > 0).")
    max_grad_norm: float = setting(
        1.0,
        "Clip the global gradient norm to this before each step; 0 turns clipping off.",
        more="Clips less often; big gradients pass through.",
        less="Clips more often; steadier but can slow learning.",
        ge=0.0,
        axolotl=("max_grad_norm",),
        llamafactory=("max_grad_norm",),
        torchtune=("clip_grad_norm",),
    )
    lr_scheduler: Scheduler = setting(
        "linear",
        "How the learning rate changes over the run after warmup.",
        axolotl=("lr_scheduler",),
        llamafactory=("lr_scheduler_type",),
    )
    lr_cycles: float = setting(
        1.0,
        "With `cosine_with_restarts`: how many cosine cycles the run has.",
        gt=0,
    )
    lr_power: float = setting(1.0, "With `polynomial`: the power of the decay.", gt=0)
    min_lr_ratio: float = setting(
        0.0,
        "The learning rate at the end of a decaying schedule, as a fraction of the peak.",
        ge=0.0,
        lt=1.0,
        axolotl=("cosine_min_lr_ratio",),
    )
    warmup_steps: int = setting(
        0,
        "Steps over which the learning rate rises from 0 to its peak.",
        ge=0,
        axolotl=("warmup_steps",),
        llamafactory=("warmup_steps",),
        torchtune=("num_warmup_steps",),
    )
    warmup_ratio: float = setting(
        0.0,
        "Warmup as a fraction of all steps (used when `warmup_steps` is 0).",
        ge=0.0,
        lt=1.0,
        axolotl=("warmup_ratio",),
        llamafactory=("warmup_ratio",),
    )
    early_stopping_patience: Optional[int] = setting(
        None,
        "Stop after this many evaluations without improvement; unset disables early stopping.",
        ge=1,
        jumpstart=("early_stopping_patience",),
        axolotl=("early_stopping_patience",),
    )
    early_stopping_min_delta: float = setting(
        0.0,
        "The smallest change of the metric that counts as an improvement.",
        ge=0.0,
        jumpstart=("early_stopping_threshold",),
    )
    early_stopping_metric: str = setting(
        "eval_loss",
        "The metric early stopping and the best checkpoint are judged on (lower is better for losses).",
    )
    dropout: Optional[float] = setting(
        None,
        "Dropout inside the model (attention and hidden); unset keeps the model's own value.",
        ge=0.0,
        lt=1.0,
    )
    seed: int = setting(
        42,
        "Seed of every random choice in training (weights of new modules, dropout, shuffling).",
        ge=0,
        le=2**32 - 1,
        jumpstart=("seed",),
        axolotl=("seed",),
        llamafactory=("seed",),
        torchtune=("seed",),
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute activations in the backward pass instead of storing them: "
        "much less memory for about a third more compute.",
        jumpstart=("gradient_checkpointing",),
        axolotl=("gradient_checkpointing",),
        torchtune=("enable_activation_checkpointing",),
    )
    torch_compile: bool = setting(
        False,
        "Compile each decoder block with `torch.compile`, in place; the first steps take longer, compiling for each "
        "new batch shape. On a 2-core CPU it measured no faster (LoRA benchmark: the first step after 39 s, then "
        "643 tokens/s while recompiling and 1,114 once compiled, against 1,091-1,137 without). "
        "The stages with a recipe of their own (ppo, grpo) do not compile.",
        axolotl=("torch_compile",),
        torchtune=("compile",),
    )
    stop_on_divergence: bool = setting(
        True,
        "Stop a run whose gradients stay exactly zero (a collapsed model, often at a loss of ln(vocabulary size)) "
        "or stay over 1000 times the first steps' norms, for 5 steps in a row, naming the last good checkpoint. "
        "A non-finite loss or gradient always stops the run.",
    )


class EvaluationArgs(Group):
    eval_strategy: Optional[Literal["no", "steps", "epoch"]] = setting(
        None,
        "When to evaluate: every `eval_steps`, at each epoch's end, or never. "
        "Unset evaluates each epoch when there is validation data.",
        llamafactory=("eval_strategy",),
    )
    eval_steps: Optional[int] = setting(
        None,
        "Evaluate every this many optimizer steps.",
        ge=1,
        axolotl=("eval_steps",),
        llamafactory=("eval_steps",),
    )
    evals_per_epoch: Optional[int] = setting(
        None,
        "Evaluate this many times per epoch, evenly spaced.",
        ge=1,
        axolotl=("evals_per_epoch",),
    )
    per_device_eval_batch_size: int = setting(
        1,
        "Examples per forward pass on each device during evaluation.",
        ge=1,
        jumpstart=("per_device_eval_batch_size",),
        axolotl=("eval_batch_size",),
        llamafactory=("per_device_eval_batch_size",),
    )


class PrecisionArgs(Group):
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32",
        "Number format of the computation: `fp32` full precision, `bf16` mixed "
        "precision with bfloat16, `fp16` mixed precision with float16 and loss scaling.",
        torchtune=("dtype",),
    )
    tf32: bool = setting(
        False,
        "Let fp32 matrix products use TF32 tensor cores on Ampere or newer NVIDIA "
        "GPUs: much faster, about 3 decimal digits of precision. CUDA only.",
        axolotl=("tf32",),
        llamafactory=("tf32",),
    )


class DistributedArgs(Group):
    enable_fsdp: bool = setting(
        False,
        "Shard parameters, gradients and optimizer states across processes with "
        "PyTorch FSDP2 (one unit per decoder block), so models too large for one device "
        "can train; launch with `lmtune train --nproc N` (or torchrun / accelerate launch). "
        "With one process it trains as a single-process run, with a note. Not with qlora "
        "or int8 bases; pt and sft (rm and dpo train data parallel).",
        jumpstart=("enable_fsdp",),
    )
    fsdp_sharding_strategy: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = setting(
        "full_shard",
        "With FSDP: what is sharded. `full_shard` shards everything (least "
        "memory), `shard_grad_op` keeps parameters whole between passes, "
        "`hybrid_shard` shards within a host and replicates across hosts, `no_shard` "
        "keeps whole copies (data parallelism).",
    )
    fsdp_offload_params: bool = setting(
        False,
        "With FSDP: keep sharded parameters on the CPU between uses.",
    )
    ddp_timeout: int = setting(
        1800,
        "Seconds a process waits for the others before the run fails: a process that hangs or is stopped "
        "ends the whole job after this long, naming it. A dead process ends the job at once.",
        more="Room for slow steps (a long checkpoint write or evaluation on one process).",
        less="A hung job is found sooner.",
        ge=1,
        llamafactory=("ddp_timeout",),
    )


class OutputArgs(Group):
    output_dir: str = setting(
        "runs/lmtune",
        "The run folder: resolved config, metrics, plots, checkpoints and the final model.",
        axolotl=("output_dir",),
        llamafactory=("output_dir",),
    )
    overwrite_output_dir: bool = setting(
        False,
        "Start over in an output folder that already holds a run.",
        llamafactory=("overwrite_output_dir",),
    )
    logging_steps: int = setting(
        10,
        "Log training metrics every this many optimizer steps.",
        ge=1,
        axolotl=("logging_steps",),
        llamafactory=("logging_steps",),
        torchtune=("log_every_n_steps",),
    )
    save_steps: Optional[int] = setting(
        None,
        "Save a checkpoint every this many optimizer steps; unset saves at each epoch's end.",
        ge=1,
        axolotl=("save_steps",),
        llamafactory=("save_steps",),
    )
    save_total_limit: int = setting(
        2,
        "Keep only this many most recent checkpoints (the best one is always kept).",
        ge=1,
        axolotl=("save_total_limit",),
        llamafactory=("save_total_limit",),
    )
    resume_from_checkpoint: Optional[str] = setting(
        None,
        "Continue a run: a checkpoint folder, or `latest`.",
        axolotl=("resume_from_checkpoint",),
        llamafactory=("resume_from_checkpoint",),
    )
    report_to: list[Literal["none", "jsonl", "tensorboard", "wandb", "mlflow", "stdout"]] = setting(
        ["jsonl"],
        "Where metrics go besides the progress bar: `jsonl` (metrics.jsonl, always written), "
        "`tensorboard`, `wandb` (Weights & Biases; `pip install 'lmtune[wandb]'`), `mlflow` "
        "(`pip install 'lmtune[mlflow]'`), `stdout` (one `name=value` line per metric, what "
        "SageMaker metric definitions read). Trackers get the resolved config as the run's "
        "parameters, every logged metric, and the final model's path.",
        llamafactory=("report_to",),
    )
    run_name: Optional[str] = setting(
        None,
        "The run's name in wandb and mlflow; unset means the output_dir's folder name.",
        axolotl=("wandb_name", "mlflow_run_name"),
        llamafactory=("run_name",),
    )
    wandb_project: Optional[str] = setting(
        None,
        "Weights & Biases project; setting it turns wandb on (as in Axolotl). Unset means `lmtune`. "
        "WANDB_MODE=offline keeps the run on disk.",
        axolotl=("wandb_project",),
    )
    wandb_entity: Optional[str] = setting(None, "Weights & Biases team or user the run belongs to.", axolotl=("wandb_entity",))
    mlflow_tracking_uri: Optional[str] = setting(
        None,
        "MLflow tracking server or store (`file:./mlruns`, `http://host:5000`); setting it turns mlflow on "
        "(as in Axolotl). Unset means MLFLOW_TRACKING_URI, or MLflow's own default.",
        axolotl=("mlflow_tracking_uri",),
    )
    mlflow_experiment_name: Optional[str] = setting(
        None, "MLflow experiment the run is recorded in; unset means `lmtune`.", axolotl=("mlflow_experiment_name",)
    )
    plot_loss: bool = setting(
        True,
        "Draw the train and eval loss curves to `plots/loss.png` at the end.",
        llamafactory=("plot_loss",),
    )

    _lists = field_validator("report_to", mode="before")(split_commas)


class GenerationArgs(Group):
    max_new_tokens: int = setting(
        128,
        "Longest answer generated by `chat`, `eval` and the `ppo` and `grpo` rollouts, in tokens.",
        ge=1,
        llamafactory=("max_new_tokens",),
    )
    do_sample: bool = setting(
        False,
        "Sample answers instead of always taking the most likely token.",
        llamafactory=("do_sample",),
    )
    temperature: float = setting(
        1.0,
        "With sampling: how flat the token distribution is made.",
        more="More varied, less reliable answers.",
        less="More predictable answers.",
        gt=0.0,
        llamafactory=("temperature",),
    )
    top_p: float = setting(
        1.0,
        "With sampling: sample only from the smallest set of tokens whose probability adds up to this.",
        gt=0.0,
        le=1.0,
        llamafactory=("top_p",),
    )
    top_k: int = setting(
        50,
        "With sampling: sample only from this many most likely tokens (0 = no limit).",
        ge=0,
        llamafactory=("top_k",),
    )
    repetition_penalty: float = setting(
        1.0,
        "Lower the odds of tokens already generated (1 = no penalty).",
        gt=0.0,
        llamafactory=("repetition_penalty",),
    )


class SageMakerArgs(Group):
    """Reserved hyperparameters a SageMaker job passes along (recorded), and what the entry point writes."""

    sagemaker_job_name: Optional[str] = setting(None, "SageMaker: the training job's name (recorded).")
    sagemaker_program: Optional[str] = setting(None, "SageMaker: the entry script's name (recorded).")
    sagemaker_region: Optional[str] = setting(None, "SageMaker: the AWS region of the job (recorded).")
    sagemaker_submit_directory: Optional[str] = setting(
        None, "SageMaker: where the job's source archive came from (recorded)."
    )
    sagemaker_container_log_level: Optional[int] = setting(
        None, "SageMaker: Python logging level of the container (10 debug ... 40 error): lmtune's own log level; "
        "libraries' loggers follow it only above warning, so their debug output never floods the job's log."
    )
    merge_adapter: bool = setting(
        True,
        "SageMaker entry point: a LoRA run's model directory gets the adapter merged into its base, a whole "
        "model as JumpStart's fine-tuning leaves it (deployable as is); false writes the PEFT adapter alone.",
    )


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    model: ModelArgs = Field(default_factory=ModelArgs)
    finetuning: FinetuningArgs = Field(default_factory=FinetuningArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    training: TrainingArgs = Field(default_factory=TrainingArgs)
    evaluation: EvaluationArgs = Field(default_factory=EvaluationArgs)
    precision: PrecisionArgs = Field(default_factory=PrecisionArgs)
    distributed: DistributedArgs = Field(default_factory=DistributedArgs)
    output: OutputArgs = Field(default_factory=OutputArgs)
    generation: GenerationArgs = Field(default_factory=GenerationArgs)
    sagemaker: SageMakerArgs = Field(default_factory=SageMakerArgs)

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat key, as a config file writes it."""
        out: dict[str, Any] = {}
        for values in self.model_dump(mode="json").values():
            out.update(values)
        return out


GROUPS: dict[str, type[Group]] = {
    name: field.annotation for name, field in Config.model_fields.items()  # type: ignore[misc]
}

# flat key -> group name; a key in two groups would make the flat file ambiguous.
KEY_GROUP: dict[str, str] = {}
for _group, _cls in GROUPS.items():
    for _key in _cls.model_fields:
        assert _key not in KEY_GROUP, f"setting {_key} is defined in two groups"
        KEY_GROUP[_key] = _group


def field_info(key: str):
    return GROUPS[KEY_GROUP[key]].model_fields[key]


def default_of(key: str) -> Any:
    info = field_info(key)
    default = info.get_default(call_default_factory=True)
    return default
