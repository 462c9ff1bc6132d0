"""Where a model's thinking starts and ends: the one module that reads `<think>` / `</think>`.

Reasoning model families write the same thing three ways (README, "Model families"):
- Qwen3 (hybrid thinking): the generation prompt ends at `<|im_start|>assistant\\n`; the model writes
  `<think>\\n...\\n</think>\\n\\n<answer>` itself. Its template re-renders an assistant turn by
  splitting at `</think>`.
- Qwen3-2507-Thinking, Qwen3.5-style and DeepSeek-R1-Distill: the generation prompt already ends in
  `<think>\\n`; the model writes only `...\\n</think>\\n\\n<answer>`. Qwen3.5-style templates split an
  assistant turn only when both tags are in it; R1-Distill's keeps only the text after `</think>`.

So the same completion means different things after different prompts: text with no `</think>`
after a prompt that opened the thinking is thinking that never closed (cut off by the token
budget), and has no answer. Every caller (eval grading, RL reward and cold-start gate, verified-
trace selection, teacher-written data, training-text formatting) asks this module, through
`prompt_opens_thinking` and `split_completion`.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered generation prompt leaves a thinking block open for the model to continue
    (it ends in `<think>`, trailing whitespace aside), as R1-Distill's and Qwen3.5's templates do."""
    return prompt.rstrip().endswith(THINK_OPEN)


@dataclass(frozen=True)
class Completion:
    """A completion split at its thinking. `thinking`: the reasoning text (None: no thinking at all);
    `answer`: the text after the thinking (None: the thinking never closed, so there is no answer)."""

    thinking: str | None
    answer: str | None

    def same_as(self, other: Completion) -> bool:
        """Equal up to the whitespace templates add or strip around the tags; no thinking and an
        empty thinking block are the same (Qwen3 renders a turn without thinking with an empty one)."""
        def norm(s):
            return None if s is None else s.strip()

        return (norm(self.thinking) or "") == (norm(other.thinking) or "") and norm(self.answer) == norm(other.answer)


def split_completion(text: str, prompt_opened: bool = False) -> Completion:
    """Split what the model wrote after its generation prompt. The answer is the text after the
    last `</think>` (a `\\boxed{}` tried inside the thinking does not count); thinking that was opened,
    by the prompt or by the text, and never closed leaves no answer; text with no thinking at all is
    all answer."""
    if THINK_CLOSE in text:
        thinking, answer = text.rsplit(THINK_CLOSE, 1)
        head = thinking.lstrip()
        return Completion(head[len(THINK_OPEN):] if head.startswith(THINK_OPEN) else thinking, answer)
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        return Completion(head[len(THINK_OPEN):], None)
    if prompt_opened or THINK_OPEN in text:
        return Completion(text, None)
    return Completion(None, text)


def answer_text(text: str, prompt_opened: bool = False) -> str | None:
    """The final answer of a completion, or None when its thinking never closed (see split_completion)."""
    return split_completion(text, prompt_opened).answer


def with_open_tag(response: str) -> str:
    """A response that starts inside its thinking (`3+5=8\\n</think>\\n\\n\\boxed{8}`, what a model whose
    prompt opened `<think>` writes) with its opening tag restored, so every template sees a whole
    `<think>...</think>` block (Qwen3.5-style templates split a turn only when both tags are there)."""
    if THINK_CLOSE in response and THINK_OPEN not in response.split(THINK_CLOSE, 1)[0]:
        return f"{THINK_OPEN}\n{response.lstrip()}"
    return response


def continuation(response: str, prompt_opened: bool) -> str:
    """What the model writes after its generation prompt to produce `response`: a prompt that opened
    the thinking already holds `<think>\\n`, so the response's own opening tag (and the newline after
    it) is dropped instead of appearing twice."""
    if prompt_opened:
        head = response.lstrip()
        if head.startswith(THINK_OPEN):
            return head[len(THINK_OPEN):].lstrip("\n")
    return response
