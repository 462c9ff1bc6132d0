"""The rl stage's GRPO trainer (TRL's GRPOTrainer with quantized rollouts): what a non-finite step records."""

import math

import torch

from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant

from ..conftest import NaNBackward, tiny_qwen3


def _two_grpo_steps(tmp_path, tokenizer, poison_norm=None, trainer_base=None, nonfinite_log=None,
                    poisoned=lambda student: student.model.norm, calls_per_step=1):
    """A real TRL GRPO run of the quantized student (the rl stage's trainer), two optimizer steps; `poison_norm`
    (a function of the output of the module `poisoned` picks, by default the final norm, applied in the second
    training forward) or `trainer_base` (a function of the trainer class returning a subclass) poison that step.
    `calls_per_step`: how often that module runs with gradients per step (2 inside a decoder layer: TRL's
    gradient checkpointing runs the layer again in the backward, and that second output is the one the backward
    uses). Returns the trainer and the student."""
    from datasets import Dataset
    from trl import GRPOConfig

    from reasoning_qat.stages.rl import _trainer_class
    from reasoning_qat.training import quiet_training_args

    student = tiny_qwen3(vocab_size=len(tokenizer))
    swap_in_fake_quant(student, QuantTargets(QuantScheme(4, 32)))
    training_forwards = 0

    def poison(module, args, out):
        nonlocal training_forwards
        if torch.is_grad_enabled():
            training_forwards += 1
            if (training_forwards - 1) // calls_per_step == 1 and poison_norm is not None:
                return poison_norm(out)
        return None

    poisoned(student).register_forward_hook(poison)
    args = quiet_training_args(GRPOConfig, output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3,
                               per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                               logging_steps=1, save_strategy="no", seed=0)
    data = Dataset.from_list([{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)])

    def reward(prompts, completions, **kwargs):  # varies within a group, so the advantages are not all zero
        return [float(len(c) % 3) for c in completions]

    cls = _trainer_class(1e-3)
    trainer = (trainer_base(cls) if trainer_base else cls)(model=student, reward_funcs=[reward], args=args,
                                                           train_dataset=data, processing_class=tokenizer)
    trainer.nonfinite_log = nonfinite_log
    trainer.train()
    assert training_forwards == 2 * calls_per_step and trainer.counts["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the skipped step wrote nothing
    return trainer


def test_a_skipped_grpo_step_is_on_disk_and_in_the_log_as_it_happens(tmp_path, tokenizer, capsys):
    """The skipped step's record is appended to the run's nonfinite_steps.jsonl when the step is skipped, not
    only in rl_metrics.json at the stage's end: the GPU organism lost four NaN steps' records to a machine that
    went away mid-run . The log says which step and where the probes saw it."""
    from reasoning_qat.training import read_records

    log = tmp_path / "rl" / "nonfinite_steps.jsonl"
    trainer = _two_grpo_steps(tmp_path, tokenizer, poison_norm=lambda out: out * float("nan"), nonfinite_log=log)
    (written,) = read_records(log)
    assert written == trainer.counts["nonfinite_steps"][0] and written["global_step"] == 2
    assert written["loss_finite"] is False
    assert f"rl: step 2 skipped: non-finite gradients in {written['parameters']} parameters" in capsys.readouterr().err


def test_records_written_before_a_crash_are_read_back_and_a_cut_off_line_is_skipped(tmp_path):
    from reasoning_qat.training import append_record, read_records

    path = tmp_path / "steps.jsonl"
    assert read_records(path) == []
    append_record(path, {"global_step": 3, "nan": True})
    append_record(path, {"global_step": 9, "nan": False})
    with open(path, "a") as f:
        f.write('{"global_step": 12, "na')  # the process killed mid-write
    assert read_records(path) == [{"global_step": 3, "nan": True}, {"global_step": 9, "nan": False}]


def test_a_nan_forward_in_grpo_is_logged_as_nan_and_its_skipped_step_says_so(tmp_path, tokenizer):
    """The second step's training forward poisoned (the final norm's output times NaN, as an overflow in the
    residual stream would): the step is skipped with `loss_finite: False` and the logged loss is NaN.
    transformers' default logs the running mean in place of a NaN loss, which made the GPU organism's NaN steps
    look like a finite loss with NaN gradients ; the rollouts (no grad) and the first step stay
    untouched."""
    trainer = _two_grpo_steps(tmp_path, tokenizer, poison_norm=lambda out: out * float("nan"))
    (record,) = trainer.counts["nonfinite_steps"]
    assert record["step"] == 2 and record["loss_finite"] is False and record["micro_batch_losses"] == ["nan"]
    assert record["above_layers"] == ["model.norm.weight", "lm_head.weight"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])


def test_a_nan_entering_the_grpo_backward_is_placed_above_in_or_below_the_lm_head(tmp_path, tokenizer):
    """A finite forward whose backward turns NaN (the GPU organism's fourth case: finite loss, every gradient
    NaN, the LM head's included). The skipped step's probes say where: poisoned in the gradient of the per-token
    log-probs (the GRPO loss's side), the NaN is at the head's output already; poisoned at the final norm's
    output (below the head), both probes stay finite and the head's weight gradient too."""
    def nan_at_log_probs(cls):
        class Poisoned(cls):
            def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
                logps, *rest = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
                if torch.is_grad_enabled() and self.state.global_step == 1:
                    logps = NaNBackward.apply(logps)
                return (logps, *rest)
        return Poisoned

    above = _two_grpo_steps(tmp_path / "above", tokenizer, trainer_base=nan_at_log_probs)
    (record,) = above.counts["nonfinite_steps"]
    assert record["loss_finite"] is True and record["step"] == 2
    assert record["grad_at_log_probs_finite"] is False and record["grad_at_head_input_finite"] is False
    assert "lm_head.weight" in record["above_layers"]

    below = _two_grpo_steps(tmp_path / "below", tokenizer, poison_norm=NaNBackward.apply)
    (record,) = below.counts["nonfinite_steps"]
    assert record["loss_finite"] is True
    assert record["grad_at_log_probs_finite"] is True and record["grad_at_head_input_finite"] is True
    assert record["above_layers"] == ["model.norm.weight"]  # the head's weight gradient stayed finite


def test_a_nan_query_gradient_in_the_top_layer_leaves_the_gpu_records_signature(tmp_path, tokenizer):
    """The five non-finite GPU records of the W2 GRPO runs (research: table-t350d) all read: loss and both head probes finite,
    deepest non-finite layer the top one, there only q_proj, q_norm and input_layernorm non-finite, k/v/o and the
    MLP finite. A NaN put into the top layer's query gradient alone (q_norm's output, before RoPE and attention)
    leaves exactly that record, which is what cuDNN SDPA's backward returns (NaN grad_q, finite grad_k and grad_v;
    pytorch/pytorch#196678). The record also lists each micro-batch's padded length and left-padded rows, the
    kernel bug's conditions (length 64 mod 128, fully masked query rows)."""
    from reasoning_qat.quant.fake_quant import train_quantizers

    lengths = []

    def seen_lengths(cls):
        class Seen(cls):
            def __init__(self, *args, model, **kwargs):
                train_quantizers(model, False)  # the recipe's rl.train_scales: false, as on the GPU
                super().__init__(*args, model=model, **kwargs)

            def _compute_loss(self, model, inputs):
                lengths.append(inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1])
                return super()._compute_loss(model, inputs)
        return Seen

    trainer = _two_grpo_steps(tmp_path, tokenizer, poison_norm=NaNBackward.apply, trainer_base=seen_lengths,
                              poisoned=lambda student: student.model.layers[-1].self_attn.q_norm, calls_per_step=2)
    (record,) = trainer.counts["nonfinite_steps"]
    top = len(trainer.model.model.layers) - 1
    assert record["loss_finite"] is True and record["above_layers"] == []
    assert record["grad_at_log_probs_finite"] is True and record["grad_at_head_input_finite"] is True
    assert record["deepest_layer"] == top
    assert record["deepest_layer_nonfinite"] == ["self_attn.q_proj.weight", "self_attn.q_norm.weight",
                                                 "input_layernorm.weight"]
    assert {"self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "self_attn.k_norm.weight", "mlp.down_proj.weight"} <= set(record["deepest_layer_finite"])
    (batch,) = record["micro_batches"]
    assert batch["sequence_length"] == lengths[1] and batch["sequence_length_mod_128"] == lengths[1] % 128
    assert 0 <= batch["left_padded_rows"] <= 4 and isinstance(batch["left_padded_rows"], int)
    assert trainer.counts["cudnn_sdpa"] is True  # this trainer ran outside the stage's sdpa_cudnn(False)


def test_sdpa_cudnn_sets_the_flag_for_the_block_and_puts_it_back_on_error():
    from reasoning_qat.training import sdpa_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        with sdpa_cudnn(False):
            assert torch.backends.cuda.cudnn_sdp_enabled() is False
            raise RuntimeError("a training step failed")
    except RuntimeError:
        pass
    assert torch.backends.cuda.cudnn_sdp_enabled() is before
    with sdpa_cudnn(True):
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    assert torch.backends.cuda.cudnn_sdp_enabled() is before
