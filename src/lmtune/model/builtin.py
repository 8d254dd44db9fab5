"""Small models lmtune builds itself, so tests and the quickstart never download.

`builtin:tiny` (tests) and `builtin:small` (quickstart) are Llama-architecture
models with a byte-level BPE tokenizer trained on text generated here. They are
built once, deterministically, into the cache folder and then loaded like any
local Hugging Face model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

PREFIX = "builtin:"
BUILD_VERSION = "1"

SPECS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2),
}
VOCAB_SIZE = 1024
CONTEXT = 2048

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML, with generation markers so loss masks can come from the template itself.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a an and or but of to in on at for with from by about as into like through after over between out "
    "against during without before under around among is are was were be been being have has had do does did "
    "say says said go goes went make made know knew think thought take took see saw come came want give gave "
    "use find found tell told ask asked work seem feel try leave call answer question number word list reverse "
    "repeat sort count first second third last next previous capital country city river mountain water fire "
    "earth air sun moon star day night year time people way thing man woman child world life hand part place "
    "case week company system program point government home fact group problem right left true false yes no "
    "summarise text sentence convert temperature degrees celsius fahrenheit name prime whole divisible only "
    "itself boiling sea level rain field village hill dry flood model train data loss learning rate token "
    "please explain why how what when where which who whose because therefore however instruction input "
    "output response user assistant system hello thanks good bad small large fast slow new old high low"
).split()


def cache_root() -> Path:
    return Path(os.environ.get("LMTUNE_HOME", Path.home() / ".cache" / "lmtune"))


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer learns its merges from: words, digits, punctuation, chat markup."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            words = rng.choices(WORDS, k=rng.randint(4, 14))
            out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
        elif kind < 0.8:
            digits = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 8)))
            out.append(f"{rng.choice(['Reverse', 'Repeat', 'Sort', 'Count'])}: {digits}")
        else:
            out.append(f"### {rng.choice(['Instruction', 'Input', 'Response'])}:\n{' '.join(rng.choices(WORDS, k=6))}")
    return out


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama 3's tokenizer: BOS is added on encode, so templates that write it too give two.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=CONTEXT,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def build_model(folder: Path, spec: dict, tokenizer_folder: Path) -> None:
    import torch

    from .unused_imports import import_modeling_without_scipy

    import_modeling_without_scipy()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **spec,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)


def builtin_path(name: str) -> Path:
    """The folder of a builtin model, building it on first use."""
    size = name.removeprefix(PREFIX)
    if size not in SPECS:
        raise ValueError(f"base_model: no builtin model {name!r}; use one of " + ", ".join(PREFIX + s for s in SPECS))
    folder = cache_root() / "builtin" / f"{size}-v{BUILD_VERSION}"
    if (folder / "done.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {name} once into {folder} (offline, seconds)", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=folder.parent))
    try:
        build_tokenizer(staging)
        build_model(staging, SPECS[size], staging)
        (staging / "done.json").write_text(json.dumps({"name": name, "spec": SPECS[size]}))
        try:
            staging.rename(folder)  # atomic: a half-built folder is never seen
        except OSError:
            if not (folder / "done.json").exists():  # another process won the race if it exists
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
