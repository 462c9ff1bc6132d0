"""Loading models and tokenizers (hub ids or local directories), and building the demo teacher."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SpecError, UserError

if TYPE_CHECKING:
    import torch


def resolve_dtype(name: str):
    """torch dtype of a recipe's dtype name (bfloat16, float16, float32)."""
    import torch  # here, not at module level: the preflight's path checks (looks_like_path) import nothing heavy

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False, revision: str | None = None, **kwargs):
    """kwargs go to `from_pretrained` (e.g. gguf_file)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path_or_id: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
               revision: str | None = None, device: str | None = None, attn_implementation: str | None = None,
               **kwargs):
    """kwargs go to `from_pretrained` (e.g. gguf_file). dtype: a torch dtype; None means bfloat16.
    attn_implementation: transformers' attention kernel (None: its default, sdpa)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(
        path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
        attn_implementation=attn_implementation, **kwargs
    )
    model = model.to(device) if device else model
    # A W4A4KV4 (or rotated) export: its quant_spec.json names the online rotations and activation/KV
    # quantizers it computes with; without them the weights alone are a different function.
    from .quant.runtime import install_quant_spec, read_quant_spec

    if Path(path_or_id).is_dir():
        install_quant_spec(model, read_quant_spec(path_or_id))
    return model


def end_token_ids(tokenizer, generation_config=None, config=None) -> list[int]:
    """Every token id that ends a generation, in order: the generation config's `eos_token_id` (an
    int or a list; Qwen3 lists `<|im_end|>` and `<|endoftext|>`, R1-Distill `<｜end▁of▁sentence｜>`),
    the model config's, then the tokenizer's end token. Both eval backends and teacher-written data
    stop on all of them, so `truncated` means the token budget ran out and nothing else."""
    ids: list[int] = []
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids += [value] if isinstance(value, int) else list(value or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def saved_end_token_ids(path_or_id: str, tokenizer, trust_remote_code: bool = False, revision: str | None = None) -> list[int]:
    """end_token_ids of a saved model (its generation_config.json where it has one, and config.json)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path_or_id, revision=revision)
    except OSError:  # no generation_config.json: the model config's eos_token_id decides
        generation = None
    try:
        config = load_config(path_or_id, trust_remote_code, revision)
    except (OSError, ValueError):
        config = None
    return end_token_ids(tokenizer, generation, config)


def looks_like_path(ref: str) -> bool:
    """A reference meant as a local path rather than a hub id ('org/name'): absolute, relative with
    ./ ../ ~, a data-file suffix, more than one '/', or anything a hub id cannot be (spaces, say)."""
    return (ref.startswith(("/", "./", "../", "~")) or ref.endswith((".jsonl", ".json", ".txt", ".yaml", ".gguf"))
            or ref.count("/") > 1 or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", ref))


def _config_file(ref: str, field: str, revision: str | None = None) -> Path | None:
    """The config.json of the model `ref` names, found without torch or transformers: a local model
    directory's, or a hub id's in the local cache. None where transformers must be asked (a GGUF file's
    metadata, a hub id not cached while the hub is on). Raises UserError for what cannot be had."""
    from huggingface_hub import constants, try_to_load_from_cache

    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{field}: no such GGUF file {ref!r}")
        return None
    if path.exists() or looks_like_path(ref):
        if not path.is_dir():
            raise UserError(f"{field}: no such local model directory {ref!r} (a hub id looks like 'org/name')")
        if not (path / "config.json").is_file():
            raise UserError(f"{field}: {ref!r} holds no readable model config (config.json); give a model directory "
                            "saved by save_pretrained, or a hub id")
        return path / "config.json"
    cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{field}: {ref!r} is a hub id that is not in the local cache, and the hub is off "
                        "(HF_HUB_OFFLINE=1); give a local model directory, or download it once with network access")
    if (host := _unreachable_hub()) is not None:  # one probe, not the hub client's five retries with backoff
        raise UserError(f"{field}: {ref!r} is a hub id that is not in the local cache, and {host} cannot be reached "
                        "from here; give a local model directory, or download it once with network access")
    return None


def _unreachable_hub(timeout_s: float = 3.0) -> str | None:
    """The hub's host when a TCP connection to it fails within `timeout_s` (no DNS, no route), else None. Not
    probed behind a proxy (the proxy decides what is reachable)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return url.hostname
    return None


def read_config_dict(ref: str, field: str, revision: str | None = None) -> dict | None:
    """config.json of the model `ref` names as a dict, read without torch or transformers (see
    _config_file); None where only transformers can say. Raises UserError (naming `field`) for a model
    that cannot be had or a config.json that is not a JSON object."""
    file = _config_file(ref, field, revision)
    if file is None:
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{field}: {str(file)!r} is not a readable JSON model config ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{field}: {str(file)!r} is not a JSON object")
    return data


def resolve_model(ref: str, field: str, trust_remote_code: bool = False, revision: str | None = None):
    """The transformers config of the model `ref` names, or one line (UserError naming `field`) saying
    why it cannot be had: a local path that does not exist or holds no config.json, or a hub id that is
    not in the local cache while the hub is off (HF_HUB_OFFLINE) or cannot be reached. Offline first: a
    cached hub model costs no network round trip. A `.gguf` file's config comes from its metadata."""
    path = Path(ref).expanduser()
    file = _config_file(ref, field, revision)
    if ref.endswith(".gguf"):
        try:
            return load_config(str(path.parent), trust_remote_code, gguf_file=path.name)
        except (OSError, ValueError) as err:
            raise UserError(f"{field}: {ref!r} is not a GGUF file transformers can read ({err})") from None
    if file is not None:  # a local model directory's config.json, or a cached hub id's
        return load_config(str(path), trust_remote_code) if path.is_dir() else \
            load_config(ref, trust_remote_code, revision, local_files_only=True)
    try:
        return load_config(ref, trust_remote_code, revision)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{field}: cannot load {ref!r} from the hub ({first[:200]}); give a local model directory, "
                        "or check the id and the network") from None


def load_config(path_or_id: str, trust_remote_code: bool = False, revision: str | None = None, **kwargs):
    """kwargs go to `from_pretrained` (e.g. gguf_file)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, revision=revision, **kwargs)


def demo_config_dict(demo) -> dict:
    """The demo teacher's shapes as config.json fields (Qwen3), without the tokenizer's ids and vocabulary
    (the preflight's model-shape checks need no more). head_dim is set on its own, as in Qwen3 (it need
    not be hidden_size / num_heads)."""
    if demo.num_heads % demo.num_kv_heads:
        raise SpecError("num_kv_heads", f"{demo.num_kv_heads} does not divide num_heads {demo.num_heads}")
    return {"model_type": "qwen3", "hidden_size": demo.hidden_size, "intermediate_size": demo.intermediate_size,
            "num_hidden_layers": demo.num_layers, "num_attention_heads": demo.num_heads,
            "num_key_value_heads": demo.num_kv_heads, "head_dim": demo.head_dim}


def demo_config(demo, tokenizer, max_positions: int = 256):
    """Qwen3 config of the demo teacher (demo_config_dict's shapes); end-of-turn and padding ids come from
    the tokenizer, so engines that read them from config.json (vLLM) stop where transformers does."""
    from transformers import Qwen3Config

    shapes = {k: v for k, v in demo_config_dict(demo).items() if k != "model_type"}
    return Qwen3Config(
        **shapes,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eos_token),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # engines cap the context at this (vLLM's max_model_len): room for the longest prompt + response
        max_position_embeddings=max_positions if demo.task == "arith" else max(max_positions, 2 * demo.max_length),
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )


def best_device() -> str:
    """The one place that picks the device: this process's GPU (LOCAL_RANK under a launcher), else CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
