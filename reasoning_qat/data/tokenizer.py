"""A character-level tokenizer with Qwen3's special tokens and chat template, built locally.

The demo cannot download Qwen3's tokenizer, so it builds one with the same chat/thinking format:
`<|im_start|>role\\n...<|im_end|>`, `<think>...</think>`, and `enable_thinking` in the template.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

THINK_TAGS = ("<think>", "</think>")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]

# Qwen3's template reduced to what the demo needs; thinking on by default, as in Qwen3.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_char_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS, eos_token: str = "<|im_end|>",
                         pad_token: str = "<|endoftext|>", bos_token: str | None = None,
                         chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Printable characters plus `special_tokens` (ids 0.. in that order). The defaults are the demo's
    Qwen3 conventions; the model-family conformance tests build other families' tokenizers with it."""
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    # The thinking tags are added tokens but not special ones, as in Qwen3's and R1-Distill's own
    # tokenizers: a decode that skips special tokens (TRL's GRPO does, before its reward functions)
    # keeps them, so rewards see where the thinking ends.
    core.add_special_tokens([t for t in special_tokens if t not in THINK_TAGS])
    core.add_tokens([t for t in special_tokens if t in THINK_TAGS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token="<unk>",
        bos_token=bos_token,
    )
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok
