"""Generation backends. Each takes chat-formatted prompts and returns k completions per prompt;
prompt building, grading and metrics are shared (evaluation/runner.py), so the backends stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Completion:
    text: str
    num_tokens: int
    truncated: bool  # stopped by max_new_tokens rather than by the end-of-turn token


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def pick_backend(name: str) -> str:
    if name == "auto":
        return "vllm" if vllm_available() else "transformers"
    if name == "vllm" and not vllm_available():
        raise RuntimeError("eval.backend: vllm is not installed or no GPU is visible; use backend: transformers")
    return name


class TransformersBackend:
    """Batched `generate` with left padding; works on CPU and any GPU."""

    def __init__(self, model_path: str, dtype=None, device: str | None = None, batch_size: int = 64,
                 trust_remote_code: bool = False):
        from ..models import best_device, load_model, load_tokenizer

        self.device = device or best_device()
        dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, dtype, trust_remote_code, device=self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 64) -> TransformersBackend:
        """Generate with an in-memory model (e.g. a fake-quant student) instead of a checkpoint."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.tokenizer.padding_side = "left"
        return self

    @torch.no_grad()
    def generate(self, prompts: list[str], k: int, temperature: float, top_p: float, top_k: int,
                 max_new_tokens: int, seed: int = 0) -> list[list[Completion]]:
        torch.manual_seed(seed)
        tok = self.tokenizer
        eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
        flat = [p for p in prompts for _ in range(k)]
        out: list[Completion] = []
        for i in tqdm(range(0, len(flat), self.batch_size), desc="generate", leave=False):
            batch = flat[i : i + self.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None) \
                if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id, **sampling)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new:
                ended = (row == eos).nonzero()
                n = int(ended[0]) + 1 if len(ended) else int((row != tok.pad_token_id).sum())
                out.append(Completion(tok.decode(row[:n], skip_special_tokens=False).replace(tok.eos_token, ""),
                                      n, truncated=not len(ended)))
        return [out[j * k : (j + 1) * k] for j in range(len(prompts))]


class VLLMBackend:
    """vLLM offline inference (tensor parallel optional). Loads dequantized or GPTQ 4/8-bit exports."""

    def __init__(self, model_path: str, tensor_parallel_size: int = 1, trust_remote_code: bool = False, seed: int = 0):
        from vllm import LLM

        self.llm = LLM(model=model_path, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       trust_remote_code=trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts, k, temperature, top_p, top_k, max_new_tokens, seed: int = 0):
        from vllm import SamplingParams

        params = SamplingParams(n=k, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens, seed=seed)
        results = self.llm.generate(prompts, params)
        return [[Completion(o.text, len(o.token_ids), o.finish_reason == "length") for o in r.outputs] for r in results]


def make_backend(name: str, model_path: str, batch_size: int = 64, tensor_parallel_size: int = 1,
                 trust_remote_code: bool = False, seed: int = 0):
    name = pick_backend(name)
    if name == "vllm":
        return VLLMBackend(model_path, tensor_parallel_size, trust_remote_code, seed)
    return TransformersBackend(model_path, batch_size=batch_size, trust_remote_code=trust_remote_code)
