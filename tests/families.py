"""Test fixtures for the model families the project supports (README, "Model families").

Each family is rebuilt locally with the behaviours that matter here, taken from its published chat
template and generation config: where the thinking opens (in the generation prompt or by the
model), how an assistant turn is re-rendered (split at `</think>`, only when both tags are there,
or thinking dropped), its end-of-sequence tokens (all of them, as generation_config.json lists them)
and whether the output head is tied to the embedding. The tokenizers are character-level (no hub);
the special tokens, templates and configs are the families' own.

Token id 0 is, in every family, an end token that is not the tokenizer's `eos_token` where the
family has two (Qwen3's `<|endoftext|>`): a model whose final norm is zeroed has all-zero logits
and greedily emits id 0, which tests generation stopping on the second end token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from reasoning_qat.data.tokenizer import build_char_tokenizer

# Qwen3's own template (Qwen3-0.6B ... 32B), tools left out: an assistant turn is split at `</think>`
# (content before it is the reasoning), the last turn always gets a thinking block, the generation
# prompt leaves the model to open `<think>` itself; enable_thinking=false writes an empty block.
_QWEN3_TURNS = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}{%- set ns.last_query_index = index %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if SPLIT_CONDITION %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
QWEN3_TEMPLATE = _QWEN3_TURNS.replace("SPLIT_CONDITION", "'</think>' in content") + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
# Qwen3-4B-Thinking-2507 / 30B-A3B-Thinking-2507: the same turns, the generation prompt opens <think>.
QWEN3_THINKING_TEMPLATE = _QWEN3_TURNS.replace("SPLIT_CONDITION", "'</think>' in content") + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
# Qwen3.5-style: splits an assistant turn only when both tags are in it; opens <think> in the prompt
# unless thinking is switched off.
QWEN35_TEMPLATE = _QWEN3_TURNS.replace("SPLIT_CONDITION", "'<think>' in content and '</think>' in content") + (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
# DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B (tools left out): assistant turns keep only the text after
# </think>; the generation prompt opens <think>; one end token, no <|im_end|>.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
R1_SPECIAL = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
              "<unk>"]


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    special_tokens: tuple[str, ...]
    eos_token: str  # the tokenizer's
    end_tokens: tuple[str, ...]  # generation_config.json's eos_token_id, in order
    pad_token: str
    bos_token: str | None
    tied: bool  # tie_word_embeddings of the family's small models
    opens_thinking: bool  # the generation prompt ends in <think>

    def tokenizer(self):
        return build_char_tokenizer(list(self.special_tokens), self.eos_token, self.pad_token, self.bos_token,
                                    self.template)

    def model(self, tok, hidden: int = 64, layers: int = 2, seed: int = 0):
        """A tiny Qwen3-architecture model with this family's end tokens and head tying."""
        from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

        ends = tok.convert_tokens_to_ids(list(self.end_tokens))
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                          tie_word_embeddings=self.tied, eos_token_id=ends[0],
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        model = Qwen3ForCausalLM(cfg).eval()
        model.generation_config = GenerationConfig(eos_token_id=ends if len(ends) > 1 else ends[0],
                                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        return model

    def save(self, path: Path, model=None, tok=None) -> Path:
        tok = tok or self.tokenizer()
        model = model or self.model(tok)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return path


FAMILIES = {
    # Qwen3-0.6B/1.7B/4B: generation_config lists [<|im_end|>, <|endoftext|>]; config.json's eos is <|endoftext|>
    "qwen3": Family("qwen3", QWEN3_TEMPLATE, tuple(QWEN_SPECIAL), "<|im_end|>", ("<|im_end|>", "<|endoftext|>"),
                    "<|endoftext|>", None, tied=True, opens_thinking=False),
    "qwen3-thinking-2507": Family("qwen3-thinking-2507", QWEN3_THINKING_TEMPLATE, tuple(QWEN_SPECIAL), "<|im_end|>",
                                  ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>", None, tied=True, opens_thinking=True),
    "qwen3.5-style": Family("qwen3.5-style", QWEN35_TEMPLATE, tuple(QWEN_SPECIAL), "<|im_end|>",
                            ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>", None, tied=True, opens_thinking=True),
    # R1-Distill-Qwen-1.5B: bos <｜begin▁of▁sentence｜>, one end token, untied head
    "r1-distill-qwen": Family("r1-distill-qwen", R1_DISTILL_TEMPLATE, tuple(R1_SPECIAL), "<｜end▁of▁sentence｜>",
                              ("<｜end▁of▁sentence｜>",), "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", tied=False,
                              opens_thinking=True),
}
