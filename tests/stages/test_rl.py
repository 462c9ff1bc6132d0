"""The rl stage's GRPO trainer (TRL's GRPOTrainer with quantized rollouts): what a non-finite step records."""

import math

import torch

from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant

from ..conftest import tiny_qwen3


def test_a_nan_forward_in_grpo_is_logged_as_nan_and_its_skipped_step_says_so(tmp_path, tokenizer):
    """A real TRL GRPO run of the quantized student, two steps, with the second step's training forward
    poisoned (the final norm's output times NaN, as an overflow in the residual stream would): the step is
    skipped with `loss_finite: False` and the logged loss is NaN. transformers' default logs the running mean
    in place of a NaN loss, which made the GPU organism's NaN steps look like a finite loss with NaN
    gradients (issue 31); the rollouts (no grad) and the first step stay untouched."""
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
            if training_forwards == 2:
                return out * float("nan")
        return None

    student.model.norm.register_forward_hook(poison)
    args = quiet_training_args(GRPOConfig, output_dir=str(tmp_path), max_steps=2, learning_rate=1e-3,
                               per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                               logging_steps=1, save_strategy="no", seed=0)
    data = Dataset.from_list([{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)])

    def reward(prompts, completions, **kwargs):  # varies within a group, so the advantages are not all zero
        return [float(len(c) % 3) for c in completions]

    trainer = _trainer_class(1e-3)(model=student, reward_funcs=[reward], args=args, train_dataset=data,
                                   processing_class=tokenizer)
    trainer.train()
    assert training_forwards == 2 and trainer.counts["skipped_nonfinite_steps"] == 1
    (record,) = trainer.counts["nonfinite_steps"]
    assert record["step"] == 2 and record["loss_finite"] is False and record["micro_batch_losses"] == ["nan"]
    assert record["above_layers"] == ["model.norm.weight", "lm_head.weight"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the skipped step wrote nothing
