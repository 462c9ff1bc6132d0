"""QAT building blocks: student initialisations, weight averaging, separate scale learning rate."""

import pytest
import torch

from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.quant.fake_quant import fake_quant_modules
from reasoning_qat.training import WeightAveraging

from ..conftest import tiny_qwen3


def test_bf16_init_keeps_latent_weights_rtn_init_snaps_them():
    ref = tiny_qwen3()
    w = ref.model.layers[0].mlp.up_proj.weight.detach().clone()
    a, b = tiny_qwen3(), tiny_qwen3()
    swap_in_fake_quant(a, QuantTargets(QuantScheme(2, 32)), keep_latent=True)
    swap_in_fake_quant(b, QuantTargets(QuantScheme(2, 32)))
    la, lb = a.model.layers[0].mlp.up_proj, b.model.layers[0].mlp.up_proj
    assert torch.allclose(la.latent_weight().detach(), w, rtol=1e-6, atol=0)
    assert not torch.allclose(lb.latent_weight().detach(), w, rtol=1e-3, atol=0)
    assert torch.equal(la.quantized_weight(), lb.quantized_weight())  # same function either way


def test_ema_and_lawa_averages(tmp_path):
    model = torch.nn.Linear(2, 1, bias=False)
    ema = WeightAveraging("ema", ema_decay=0.5)
    lawa = WeightAveraging("lawa", lawa_k=2, lawa_interval=1)
    values = [1.0, 3.0, 5.0]
    for step, v in enumerate(values, 1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.update(model, step)
        lawa.update(model, step)
    ema.save(tmp_path)
    restored = WeightAveraging("ema", ema_decay=0.5)
    restored.load(str(tmp_path), "cpu")
    assert restored.apply(model) == 1 and model.weight[0, 0].item() == pytest.approx(3.5)  # ((1+3)/2+5)/2
    assert lawa.apply(model) == 2 and model.weight[0, 0].item() == pytest.approx(4.0)  # mean of the last 2


def test_kd_trainer_gives_scales_their_own_learning_rate(tmp_path, tokenizer):
    from reasoning_qat.data.reasoning import PadCollator, ReasoningSFTDataset
    from reasoning_qat.kd import KDTrainer
    from reasoning_qat.recipe import KDConfig
    from reasoning_qat.training import quiet_training_args

    student, teacher = tiny_qwen3(vocab_size=len(tokenizer)), tiny_qwen3(vocab_size=len(tokenizer), seed=1)
    swap_in_fake_quant(student, QuantTargets(QuantScheme(2, 32)))
    ds = ReasoningSFTDataset([{"prompt": "What is 1+1?", "response": "<think>\n1+1=2\n</think>\n\n\\boxed{2}"}] * 8, tokenizer, 64)
    args = quiet_training_args(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                               save_strategy="no", logging_steps=1)
    before = {n: m.scale.detach().clone() for n, m in fake_quant_modules(student).items()}
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=PadCollator(tokenizer.pad_token_id),
                        teacher=teacher, kd=KDConfig(), scale_lr=0.05)
    trainer.train()
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups if g["params"]})
    assert lrs == [1e-3, 0.05]  # latent weights and quantizer scales, each under the schedule
    moved = [not torch.equal(before[n], m.scale.detach()) for n, m in fake_quant_modules(student).items()]
    assert all(moved)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(v > 0 for v in losses)


def test_non_finite_loss_stops_training_with_a_clear_message(tmp_path, tokenizer):
    from reasoning_qat.data.reasoning import PadCollator, ReasoningSFTDataset
    from reasoning_qat.kd import KDTrainer
    from reasoning_qat.recipe import KDConfig
    from reasoning_qat.training import quiet_training_args

    student, teacher = tiny_qwen3(vocab_size=len(tokenizer)), tiny_qwen3(vocab_size=len(tokenizer), seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))  # a broken teacher: the KD loss becomes NaN
    swap_in_fake_quant(student, QuantTargets(QuantScheme(2, 32)))
    ds = ReasoningSFTDataset([{"prompt": "What is 1+1?", "response": "\\boxed{2}"}] * 4, tokenizer, 64)
    args = quiet_training_args(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_strategy="no")
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, data_collator=PadCollator(tokenizer.pad_token_id),
                        teacher=teacher, kd=KDConfig())
    with pytest.raises(FloatingPointError, match=r"qat: the loss became nan at step 1; the last good checkpoint is kept"):
        trainer.train()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_one_adam_step_moves_the_grid_not_the_absolute_weight(bits):
    """QAT trains in grid units: a first Adam step of lr moves each latent weight by lr of its
    group's grid step, and each code boundary at the edge of the grid by lr grid steps, at any bit
    width (absolute parameters would move 16x more grid steps at 8 bits than at 4)."""
    from reasoning_qat.quant.fake_quant import quant_parameters

    model = tiny_qwen3()
    swap_in_fake_quant(model, QuantTargets(QuantScheme(bits, 32)))
    m = model.model.layers[0].mlp.up_proj
    with torch.no_grad():  # off the grid, as after some training: on it, LSQ gives the scales no gradient
        m.weight.add_(0.3 * torch.randn_like(m.weight))
    w0, s0 = m.latent_weight().detach().clone(), m.step_size().detach().clone()
    latents, quantizers = quant_parameters(model)
    opt = torch.optim.Adam([m.weight, m.scale], lr=0.01, eps=1e-12)  # eps far below every gradient
    model(input_ids=torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16))).loss.backward()
    opt.step()
    per_col = m.step[:, m.g_idx.long()]
    moved = ((m.latent_weight().detach() - w0).abs() / per_col)[m.weight.grad.abs() > 1e-7]
    assert torch.allclose(moved, torch.full_like(moved, 0.01), rtol=1e-2)  # float32 cancellation in w1 - w0
    half = 2 ** (bits - 1)  # the outermost code sits half grid steps from the middle
    edge_moved = ((m.step_size().detach() - s0).abs() / s0 * half)[m.scale.grad.abs() > 1e-7]
    assert torch.allclose(edge_moved, torch.full_like(edge_moved, 0.01), rtol=1e-2)
    assert any(p is m.weight for p in latents) and any(p is m.scale for p in quantizers)


@pytest.mark.slow
def test_kd_qat_from_gptq_never_ends_worse_at_any_bit_width(tmp_path):
    """One recipe's learning rates at 8, 4, 3 and 2 bits: KD-QAT started from GPTQ ends no lower
    than its start minus the CI half-width, and its logged KD loss never rises above twice the loss
    of the initialisation. The logged loss of a window depends on which batches it saw (it varies by
    1.5x between windows of the same untouched model here), so each window is read against the
    same run repeated with every learning rate at ~0 (same seed: the same batches), whose first
    value is the step-0 loss."""
    import json
    import subprocess
    import sys

    from ..conftest import demo_recipe

    def cli(*args):
        subprocess.run([sys.executable, "-m", "reasoning_qat.cli", *args], check=True, capture_output=True)

    def logged(bits):
        return [h["loss"] for h in json.loads((run / "qat" / f"w{bits}-qat" / "log_history.json").read_text()) if "loss" in h]

    rec = demo_recipe(tmp_path, name="inv", teacher_steps=300, bits="[2, 3, 4, 8]", baselines="[]", qat_steps=40,
                      save_steps=100, limit=100, shared_teacher=True)
    rec.write_text(rec.read_text().replace("eval: {", "eval: {methods: [gptq, qat], "))  # the BF16 row is not read
    cli("run", str(rec))
    run = tmp_path / "runs" / "inv"
    acc = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]
    trained = {bits: logged(bits) for bits in (2, 3, 4, 8)}
    peaks = {bits: json.loads((run / "qat" / f"w{bits}-qat" / "qat_metrics.json").read_text()) for bits in (2, 3, 4, 8)}
    frozen = rec.read_text()
    for key in ("  lr: 1.0e-5", "latent_lr: 1.0e-2", "scale_lr: 1.0e-2"):
        frozen = frozen.replace(key, key.split(":")[0] + ": 1.0e-12")
    rec.write_text(frozen)
    cli("run", str(rec), "--stages", "qat")
    for bits in (2, 3, 4, 8):
        metrics = peaks[bits]  # the log's first entry is the initialisation's loss, not a training window
        assert metrics["peak_logged_loss"] == max(trained[bits][1:]) and metrics["loss_spike"] is False, (bits, metrics)
        start, end = acc[f"w{bits}-gptq"]["demo_arith"], acc[f"w{bits}-qat"]["demo_arith"]
        assert end["pass@1"] >= start["pass@1"] - start["ci95"], (bits, start, end)
        ours, untouched = trained[bits], logged(bits)
        assert len(ours) == len(untouched) == 9 and ours[0] == pytest.approx(untouched[0])  # the step-0 loss
        assert all(a <= 2 * b for a, b in zip(ours, untouched)), (bits, ours, untouched)


def test_a_step_with_nan_gradients_is_skipped_and_three_in_a_row_stop_training():
    """The RL trainer's optimizer (skip_nonfinite_steps): a NaN gradient leaves weights and Adam's
    moments as they were instead of writing NaN into the policy, finite steps go on, and a run of
    them stops with TrainingDiverged."""
    from reasoning_qat.errors import TrainingDiverged
    from reasoning_qat.training import skip_nonfinite_steps

    model = tiny_qwen3()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats, losses = {}, []
    names = {id(p): n for n, p in model.named_parameters()}
    skip_nonfinite_steps(opt, stats, limit=3, what="rl", names=names, losses=losses)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))

    def backward(poison: bool):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss = loss * float("nan") if poison else loss
        losses.append(float(loss))  # as the RL trainer's training_step does
        loss.backward()

    backward(poison=False)
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    backward(poison=True)
    opt.step()
    assert stats["skipped_nonfinite_steps"] == 1
    # what the skipped step held: every parameter's gradient NaN (the poisoned loss), named
    (record,) = stats["nonfinite_steps"]
    assert record["step"] == 2 and record["parameters"] == len(names) and record["nan"] and not record["inf"]
    assert record["first"] == [n for n, _ in model.named_parameters()][:6]
    assert record["above_layers"] == ["model.norm.weight", "lm_head.weight"]  # the poisoned loss: from the top
    assert record["loss_finite"] is False and record["micro_batch_losses"] == ["nan"]  # the forward was NaN already
    assert losses == []  # each step takes its own losses
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in opt.state.items())
    backward(poison=False)
    opt.step()  # a finite step after a skip trains as usual (and resets the count in a row)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    backward(poison=True)
    opt.step()
    backward(poison=True)
    opt.step()
    backward(poison=True)
    with pytest.raises(TrainingDiverged, match="rl: 3 steps in a row had NaN/inf gradients"):
        opt.step()
    assert stats["skipped_nonfinite_steps"] == 4


def test_a_skipped_step_names_where_the_nan_entered_the_backward():
    """A NaN put into the gradient of the last layer's q_proj output (as a broken attention backward
    would): the record names that layer as the deepest with a non-finite gradient, nothing above
    the layers, and in it q_proj and the input norm below it non-finite, q_norm (after q_proj), k/v/o_proj
    and the MLP finite."""
    from reasoning_qat.training import skip_nonfinite_steps

    model = tiny_qwen3()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats, losses = {}, []
    skip_nonfinite_steps(opt, stats, names={id(p): n for n, p in model.named_parameters()}, losses=losses)
    last = len(model.model.layers) - 1
    poison = model.model.layers[last].self_attn.q_proj.register_forward_hook(
        lambda m, a, out: out.register_hook(lambda g: g * float("nan")) and None)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    losses.append(float(loss))
    loss.backward()
    poison.remove()
    opt.step()
    (record,) = stats["nonfinite_steps"]
    assert record["loss_finite"] is True and record["micro_batch_losses"] == [pytest.approx(float(loss))]
    assert record["above_layers"] == [] and record["deepest_layer"] == last, record
    assert set(record["deepest_layer_nonfinite"]) == {"self_attn.q_proj.weight", "input_layernorm.weight"}, record
    assert {"self_attn.k_proj.weight", "self_attn.q_norm.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"} <= \
        set(record["deepest_layer_finite"]), record
    assert record["nan"] and record["parameters"] < len(list(model.parameters()))


@pytest.mark.parametrize("run, bits, spike", [("t350b-kdf0", 2, True), ("t350b-kdf1", 2, True),
                                               ("t350b-kdf1", 3, False), ("t350b-own0", 2, False),
                                               ("t350b-cef0", 2, False)])
def test_loss_spike_flags_the_organism_runs_that_diverged(run, bits, spike):
    """On the GPU organism's recorded QAT logs (research/organism/table-t350b): KD on
    foreign traces at W2G128 rose 16-21x above its start and scored 0.000, yet ended near its start;
    the same at W3G128 (peak 5.1x, pass@1 0.891) and KD on the teacher's own traces are not flagged."""
    import json
    from pathlib import Path

    from reasoning_qat.stages.qat import loss_spike

    root = Path(__file__).parents[2] / "research/organism/table-t350b/runs"
    history = json.loads((root / f"organism-gpu-{run}" / "qat" / f"w{bits}-qat" / "log_history.json").read_text())
    initial = next(h["loss"] for h in history if h.get("initial"))
    found = loss_spike(history, initial)
    assert found["loss_spike"] is spike, found
    if spike:
        assert found["peak_logged_loss"] > 10 * initial and history[-1]["train_loss"] < 1.0
        # the last loss alone would not show it: it is back within 10% of the start
        assert [h["loss"] for h in history if "loss" in h][-1] < 1.1 * initial


def test_loss_spike_without_logged_losses_or_with_a_nan():
    from reasoning_qat.stages.qat import loss_spike

    assert loss_spike([{"step": 0, "loss": 0.1, "initial": True}], 0.1)["peak_logged_loss"] is None
    found = loss_spike([{"step": 10, "loss": float("nan")}, {"step": 20, "loss": 0.3}], 0.1)
    assert found == {"peak_logged_loss": 0.3, "peak_loss_step": 20, "peak_loss_over_initial": pytest.approx(3.0),
                     "loss_spike": False}
