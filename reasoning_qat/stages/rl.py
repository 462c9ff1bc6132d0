"""rl stage: GRPO (TRL's GRPOTrainer) on the fake-quant QAT student, reward = verified correctness
(`rl.init: ptq`: on the ptq stage's checkpoint instead, variant `ptq_rl`).

Rollouts come from the quantized policy: generation runs the student's own forward (FakeQuantLinear),
and when TRL's vLLM rollouts are on, the weights synced to vLLM are the dequantized fake-quant
weights, not the latent BF16 ones (`QuantizedGRPOTrainer`). The stage refuses to start when the
student's accuracy is below `rl.min_accuracy`: RL needs a viable cold start.
"""

from __future__ import annotations

import contextlib

import torch

from ..data.reasoning import generation_prompt
from ..data.thinking import prompt_opens_thinking, split_completion
from ..errors import UserError
from ..evaluation.backends import TransformersBackend
from ..evaluation.grader import grade
from ..models import best_device
from ..pipeline import StageContext
from ..quant.fake_quant import fake_quant_modules, frozen_fake_quant, moved_fraction, train_quantizers, weight_codes
from ..quant.formats import load_quantized_checkpoint, save_quantized_checkpoint
from ..run_layout import Variant, finished_metrics
from ..training import (
    append_record,
    grouped_optimizer,
    last_checkpoint,
    quiet_training_args,
    read_records,
    readable_progress,
    sdpa_cudnn,
    skip_nonfinite_steps,
    watch_gradients_before_clipping,
)
from .common import (
    finish_training,
    load_teacher_tokenizer,
    rl_method,
    source_rows,
    teacher_path,
)
from .specs import recipe_keys


def dequantized_named_params(model, fix_name=lambda n: n):
    """(name, tensor) pairs of the quantized function: what an inference engine must run."""
    fq = fake_quant_modules(model)
    skip = {f"{n}.{p}" for n in fq for p in ("weight", "scale", "zero")}
    dtype = next((p.dtype for n, p in model.named_parameters() if n not in skip), torch.bfloat16)
    with torch.no_grad():
        for name, m in fq.items():
            yield fix_name(f"{name}.weight"), m.quantized_weight().to(dtype)
        for name, p in model.named_parameters():
            if name not in skip:
                yield fix_name(name), p.data


def _text(message) -> str:
    return message if isinstance(message, str) else message[-1]["content"]


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the completion's final answer (after its thinking, as the eval grader reads it: a
    prompt that opened `<think>` leaves an unclosed completion without an answer) matches `answer`."""
    return [1.0 if grade(_text(c), a, prompt_opens_thinking(_text(p))).correct else 0.0
            for p, c, a in zip(prompts, completions, answer)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the completion thought, closed its thinking and boxed its answer."""
    parts = [split_completion(_text(c), prompt_opens_thinking(_text(p))) for p, c in zip(prompts, completions)]
    return [1.0 if s.thinking is not None and s.answer is not None and "\\boxed{" in s.answer else 0.0 for s in parts]


def _trainer_class(latent_lr: float):
    from trl import GRPOTrainer

    class QuantizedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose rollouts run the quantized policy: its own generation inside
        `frozen_fake_quant`, and a vLLM weight sync that sends the dequantized fake-quant weights.

        Both hooks override private TRL methods (`_generate`, `VLLMGeneration._iter_named_params`);
        they count their calls into the stage's metrics, and a test fails if a TRL upgrade stops
        calling them (pyproject pins the TRL range they were tested on)."""

        def __init__(self, *args, **kwargs):
            self.latent_lr = latent_lr  # grid steps per update (FakeQuantLinear trains in grid units)
            # what the hooks below and the non-finite-step guard count, reported in rl_metrics
            self.counts = {"quantized_rollout_batches": 0, "dequantized_weight_syncs": 0}
            self.step_losses = []  # this optimizer step's micro-batch losses, for the non-finite-step guard
            # and their shapes: the padded length and the left-padded rows (fully masked query rows), the two
            # conditions of cuDNN SDPA's NaN query gradient (training.sdpa_cudnn)
            self.step_batches = []
            # whether the gradient reaching the per-token log-probs (the LM head's output) and the one leaving the
            # head into the decoder (its input) were finite: a skipped step's record says whether a NaN came from
            # the GRPO loss, entered in the head's backward (TRL computes log-probs through its own fused LM head),
            # or below it
            self.grad_probes = {"grad_at_log_probs": [], "grad_at_head_input": []}
            self.before_clipping = {}  # where the gradients were non-finite before clipping made them all NaN
            self.nonfinite_log = None  # the run's nonfinite_steps.jsonl: each skipped step is written there at once
            super().__init__(*args, **kwargs)
            watch_gradients_before_clipping(self.accelerator, self.before_clipping)
            gen = getattr(self, "vllm_generation", None)
            if gen is not None:
                def dequantized_params():
                    self.counts["dequantized_weight_syncs"] += 1
                    return dequantized_named_params(gen.model, gen._fix_param_name_to_vllm)

                gen._iter_named_params = dequantized_params

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                names = {id(p): n for n, p in self.model.named_parameters()}
                self.optimizer = skip_nonfinite_steps(grouped_optimizer(self, self.latent_lr, self.args.learning_rate),
                                                      self.counts, what="rl", names=names, losses=self.step_losses,
                                                      probes=self.grad_probes, before_clipping=self.before_clipping,
                                                      on_skip=self._skipped_step, batches=self.step_batches)
            return self.optimizer

        def _skipped_step(self, record: dict) -> None:
            """A skipped non-finite step: say so in the log and write its record to disk now, so that a run
            stopped before its end (a time limit, a lost machine) keeps it."""
            import sys

            record["global_step"] = self.state.global_step + 1  # the optimizer step it would have been
            if not self.accelerator.is_main_process:  # the gradients are all-reduced: every rank skips the same step
                return
            where = ", ".join(f"{k} {v}" for k, v in record.items() if k.endswith("_finite") and v is not None)
            print(f"rl: step {record['global_step']} skipped: non-finite gradients in {record['parameters']} "
                  f"parameters ({where or 'no probe reached'}; deepest layer {record.get('deepest_layer')})"
                  + (f", recorded in {self.nonfinite_log}" if self.nonfinite_log else ""), file=sys.stderr, flush=True)
            if self.nonfinite_log is not None:
                append_record(self.nonfinite_log, record)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if not torch.is_grad_enabled():  # rollouts' and old-policy log-probs: no backward to watch
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

            def watch(name):
                return lambda grad: self.grad_probes[name].append(torch.isfinite(grad).all())

            def watch_head_input(module, args, out):
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                if hidden.requires_grad:
                    hidden.register_hook(watch("grad_at_head_input"))

            # the decoder (the module whose output the head reads) of the policy
            decoder = self.accelerator.unwrap_model(model).get_decoder()
            handle = decoder.register_forward_hook(watch_head_input)
            try:
                logps, *rest = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            finally:
                handle.remove()
            if logps.requires_grad:
                logps.register_hook(watch("grad_at_log_probs"))
            return (logps, *rest)

        def _compute_loss(self, model, inputs):
            prompt_mask = inputs["prompt_mask"]
            length = prompt_mask.shape[1] + inputs["completion_ids"].shape[1]
            self.step_batches.append({"sequence_length": length, "sequence_length_mod_128": length % 128,
                                      "left_padded_rows": (prompt_mask[:, 0] == 0).sum()})  # read only if skipped
            self.counts["cudnn_sdpa"] = torch.backends.cuda.cudnn_sdp_enabled()  # as the step ran (a process flag)
            return super()._compute_loss(model, inputs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss.detach())  # the guard says whether a skipped step's forward was finite
            return loss

        def _generate(self, prompts):
            # Rollouts use the quantized weights as they stand at this step, quantized once for
            # the whole batch of generations rather than at every decoding step.
            self.counts["quantized_rollout_batches"] += 1
            with frozen_fake_quant(self.accelerator.unwrap_model(self.model)):
                return super()._generate(prompts)

        def vllm_weight_gap(self) -> dict:
            """Max |w| difference between vLLM's copy of each unfused Linear and the student's
            quantized weight in vLLM's dtype (0 when the sync sends what the student computes), and
            the same against its latent weight (what a plain BF16 sync would send)."""
            gen = self.vllm_generation
            gen.sync_weights()
            engine = gen.llm.llm_engine.model_executor.driver_worker.model_runner.model
            served = dict(engine.named_parameters())
            gap_q = gap_latent = 0.0
            for name, m in fake_quant_modules(self.accelerator.unwrap_model(self.model)).items():
                w = served.get(f"{name}.weight")
                if w is not None:  # q/k/v and gate/up are fused in vLLM; o_proj and down_proj are not
                    w = w.detach().cpu()
                    gap_q = max(gap_q, (w - m.quantized_weight().detach().cpu().to(w.dtype)).abs().max().item())
                    gap_latent = max(gap_latent, (w - m.latent_weight().detach().cpu().to(w.dtype)).abs().max().item())
            return {"vllm_vs_quantized_max_abs_diff": gap_q, "vllm_vs_latent_max_abs_diff": gap_latent}

    return QuantizedGRPOTrainer


def student_accuracy(model, tok, rows: list[dict], n: int = 64, max_new_tokens: int = 256) -> float:
    """The share of the first RL prompts the student answers correctly (greedy), as a cold-start check."""
    engine = TransformersBackend.from_model(model, tok, batch_size=n)
    rows = rows[:n]
    prompts = [generation_prompt(tok, r["prompt"]) for r in rows]
    with frozen_fake_quant(model):
        outs = engine.generate(prompts, 1, 0.0, 1.0, -1, max_new_tokens)
    return sum(grade(o[0].text, r["answer"], prompt_opens_thinking(p)).correct
               for o, r, p in zip(outs, rows, prompts)) / max(len(rows), 1)


@contextlib.contextmanager
def _syncable_cpu_weights(use_vllm: bool):
    """vLLM's CPU build repacks each Linear's weight after loading (oneDNN, or AMX kernels where the
    CPU has them) and, for Linear layers, drops the weight tensor: a GRPO weight sync then fails
    ('Parameter' object has no attribute 'weight_loader') or, for the output head, would update a
    tensor the packed kernel no longer reads. While the colocated RL engine is built on CPU, every
    layer keeps plain F.linear over its own weight, which is what vLLM itself does where it skips
    the repacking; engines built afterwards (eval) get vLLM's own kernels again. Our CPU engine runs
    in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the patch reaches it; the stage's
    vllm_weight_gap (tested) checks that the synced weights are the ones served."""
    if not use_vllm or torch.cuda.is_available():
        yield
        return
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def plain(layer, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


def _vllm_args(cfg, recipe) -> dict:
    if not cfg.use_vllm:
        return {"use_vllm": False}
    from ..evaluation.backends import pick_backend

    with recipe_keys("rl", {"backend": "use_vllm"}):
        pick_backend("vllm")  # one line if vLLM cannot run here
    e = recipe.eval
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": e.gpu_memory_utilization or (0.3 if torch.cuda.is_available() else 0.2),
            "vllm_tensor_parallel_size": e.tensor_parallel_size, "vllm_max_model_length": e.max_model_len}


def run(ctx: StageContext) -> dict:
    """The rl stage: GRPO (TRL) per bit width on the QAT (or PTQ) student, rollouts from the quantized
    weights."""
    from datasets import Dataset
    from trl import GRPOConfig

    r, cfg = ctx.recipe, ctx.recipe.rl
    tok = load_teacher_tokenizer(ctx)
    rows = source_rows(ctx, cfg.data, tok)
    if not rows or "answer" not in rows[0]:
        raise UserError("rl.data: rows need an 'answer' field for the verifiable reward")
    metrics = {}
    for bits in r.quant.bits:
        v = Variant(bits, rl_method(r))
        name, out = str(v), ctx.layout.trained(v)
        if (done := finished_metrics(out, ctx.layout.variant_metrics("rl", v))) is not None:
            metrics[name] = done
            continue
        device = best_device()
        init = Variant(bits, r.ptq.method if cfg.init == "ptq" else "qat")
        student = load_quantized_checkpoint(ctx.layout.checkpoint(init), device=device,
                                            trust_remote_code=ctx.recipe.model.trust_remote_code,
                                            attn_implementation=ctx.recipe.model.attn_implementation)
        acc = student_accuracy(student, tok, rows, max_new_tokens=cfg.max_completion_length)
        if acc < cfg.min_accuracy:
            raise UserError(f"rl: the {init} student solves {acc:.1%} of the first RL prompts, below "
                             f"rl.min_accuracy={cfg.min_accuracy}; RL needs a viable start (train QAT longer or lower it)")
        if cfg.use_vllm:
            # vLLM cannot read the fake-quant checkpoint: it starts from the BF16 teacher's (same
            # architecture), and the first rollout already syncs the student's dequantized weights.
            student.name_or_path = student.config._name_or_path = teacher_path(ctx)
        start_codes = weight_codes(student)
        train_quantizers(student, cfg.train_scales)
        data = Dataset.from_list([{"prompt": generation_prompt(tok, x["prompt"]), "answer": x["answer"]} for x in rows])
        funcs, weights = [correctness_reward], [1.0]
        if cfg.format_reward > 0:
            funcs.append(format_reward)
            weights.append(cfg.format_reward)
        args = quiet_training_args(
            GRPOConfig,
            output_dir=str(ctx.layout.trainer(v)),
            report_to=r.report_to,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.batch_size,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            beta=cfg.beta,
            reward_weights=weights,
            save_steps=cfg.save_steps,
            logging_steps=1,
            bf16=cfg.bf16 and torch.cuda.is_available(),
            seed=r.seed,
            **_vllm_args(cfg, r),
        )
        with _syncable_cpu_weights(cfg.use_vllm):  # the colocated engine is built here
            trainer = _trainer_class(cfg.latent_lr)(model=student, reward_funcs=funcs, args=args, train_dataset=data,
                                                    processing_class=tok)
        readable_progress(trainer, f"rl w{bits}")
        trainer.nonfinite_log = ctx.layout.nonfinite_steps(v)
        resumed_at = last_checkpoint(args.output_dir)
        with sdpa_cudnn(r.model.cudnn_sdpa):
            result = trainer.train(resume_from_checkpoint=resumed_at)
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        # every skipped step of this variant, those of an earlier process that a resume re-ran too (each record
        # has its global_step: a step re-run after the resume can appear twice)
        skipped = read_records(trainer.nonfinite_log)
        if skipped:
            trainer.counts.update(skipped_nonfinite_steps=len(skipped), nonfinite_steps=skipped)
        rollouts = {"rollouts": "vllm" if cfg.use_vllm else "transformers", **trainer.counts,
                    **(trainer.vllm_weight_gap() if cfg.use_vllm else {})}
        save_quantized_checkpoint(student, ctx.layout.checkpoint(v), tok, {"method": v.method, "bits": bits})
        record = {"init": str(init), "start_accuracy": acc, "steps": trainer.state.global_step,
                  "mean_reward_first": sum(rewards[:5]) / max(len(rewards[:5]), 1),
                  "mean_reward_last": sum(rewards[-5:]) / max(len(rewards[-5:]), 1), **rollouts,
                  # the policy's attention kernel: the GPU organism's two NaN-gradient steps ran under sdpa
                  "attn_implementation": student.config._attn_implementation,
                  # the share of weights GRPO moved to another grid point (codes against the start's)
                  "moved_to_another_grid_point": moved_fraction(start_codes, student),
                  # wall time of the steps this process ran (a resumed run: those after its checkpoint)
                  "train_runtime_s": round(result.metrics["train_runtime"], 2), "resumed": resumed_at is not None}
        finish_training(ctx, "rl", v, record, trainer.state.log_history)
        metrics[name] = record
    return metrics
