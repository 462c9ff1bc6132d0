"""kd.py: the chunked and fused KD losses equal the naive full-logits loss, in value and in gradients; the
KD trainer (packing, schedules, fused vs chunked training)."""

import pytest
import torch

from reasoning_qat.kd import KDSpec, chunked_distill_loss, forward_kl, jsd, naive_distill_loss, reverse_kl
from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.recipe import QATConfig

from .conftest import tiny_qwen3


def setup(seed=0, vocab=50, hidden=16):
    torch.manual_seed(seed)
    head_s, head_t = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    h_s = torch.randn(2, 9, hidden, requires_grad=True)
    h_t = torch.randn(2, 9, hidden)
    labels = torch.randint(0, vocab, (2, 9))
    labels[:, :3] = -100  # prompt tokens carry no loss
    labels[1, -2:] = -100  # padding
    return head_s, head_t, h_s, h_t, labels


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "ce"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_naive(loss, chunk):
    kd = KDSpec(loss=loss, temperature=1.5 if loss != "ce" else 1.0, chunk_size=chunk)
    head_s, head_t, h_s, h_t, labels = setup()
    naive = naive_distill_loss(head_s(h_s), head_t(h_t), labels, kd)
    g_naive = torch.autograd.grad(naive, [h_s, head_s.weight])
    sel = labels[:, 1:] != -100
    chunked = chunked_distill_loss(h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, chunk)
    g_chunk = torch.autograd.grad(chunked, [h_s, head_s.weight])
    assert chunked.item() == pytest.approx(naive.item(), rel=1e-5)
    for a, b in zip(g_chunk, g_naive):
        assert torch.allclose(a, b, atol=1e-6)


def test_divergences_are_zero_only_at_the_teacher():
    t = torch.randn(5, 20)
    assert forward_kl(t, t).item() == pytest.approx(0, abs=1e-5)
    assert reverse_kl(t, t).item() == pytest.approx(0, abs=1e-5)
    assert jsd(t, t).item() == pytest.approx(0, abs=1e-5)
    s = torch.randn(5, 20)
    assert forward_kl(s, t) > 0 and reverse_kl(s, t) > 0 and jsd(s, t) > 0
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item())


def test_top_k_forward_kl_uses_teacher_support():
    torch.manual_seed(0)
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    full, top = forward_kl(s, t), forward_kl(s, t, top_k=5)
    assert top.item() != pytest.approx(full.item())
    # With k = vocab the teacher keeps its whole distribution and the loss is the full one.
    assert forward_kl(s, t, top_k=30).item() == pytest.approx(full.item(), rel=1e-5)


def test_bf16_teacher_head_with_float32_hidden_states():
    """As under Accelerate's bf16 wrapper: float32 hidden states, a bf16 teacher head."""
    kd = KDSpec(loss="forward_kl", chunk_size=4)
    head_s, head_t, h_s, h_t, labels = setup()
    head_t = head_t.to(torch.bfloat16)
    sel = labels[:, 1:] != -100
    loss = chunked_distill_loss(h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, 4)
    loss.backward()
    assert torch.isfinite(loss) and h_s.grad is not None


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "ce"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_fused_equals_chunked(loss, chunk):
    """The fused projection+loss (gradients computed in its forward pass, closed forms) gives the
    chunked autograd loss's value and gradients, for the hidden states and the head."""
    from reasoning_qat.kd import fused_distill_loss

    kd = KDSpec(loss=loss, temperature=1.5 if loss != "ce" else 1.0, jsd_beta=0.3, chunk_size=chunk)
    head_s, head_t, h_s, h_t, labels = setup(seed=1)
    sel = labels[:, 1:] != -100
    args = (h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, chunk)
    ref = chunked_distill_loss(*args)
    g_ref = torch.autograd.grad(ref * 3.0, [h_s, head_s.weight], retain_graph=True)
    fused = fused_distill_loss(*args)
    g_fused = torch.autograd.grad(fused * 3.0, [h_s, head_s.weight])  # an upstream scale reaches both gradients
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_fused_in_bf16_tracks_float32_and_trains_a_tied_head():
    """Compute dtype bf16 (what a GPU step runs): close to the float32 loss; a head tied to the
    embedding gets the gradient of both uses."""
    from reasoning_qat.kd import fused_distill_loss

    kd = KDSpec(loss="forward_kl", chunk_size=5)
    head_s, head_t, _, h_t, labels = setup(seed=2)
    emb = torch.nn.Embedding(50, 16)
    head_s.weight = emb.weight  # tied, as in Qwen3-0.6B/1.7B
    ids = torch.randint(0, 50, (2, 9))
    h_s = emb(ids) * 2
    sel = labels[:, 1:] != -100
    args = (h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, 5)
    ref = chunked_distill_loss(*args)
    (g_ref,) = torch.autograd.grad(ref, [emb.weight], retain_graph=True)
    low = fused_distill_loss(*args, dtype=torch.bfloat16)
    (g_low,) = torch.autograd.grad(low, [emb.weight])
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
    assert g_low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(g_low.flatten(), g_ref.flatten(), dim=0)
    assert cos > 0.99


def test_fused_skips_gradients_without_grad_mode():
    from reasoning_qat.kd import can_fuse, fused_distill_loss

    kd = KDSpec(loss="jsd", chunk_size=3)
    head_s, head_t, h_s, h_t, labels = setup()
    sel = labels[:, 1:] != -100
    with torch.no_grad():
        v = fused_distill_loss(h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, 3)
    assert not v.requires_grad and torch.isfinite(v)
    assert can_fuse(head_s, head_t, kd)
    assert not can_fuse(head_s, head_t, KDSpec(loss="forward_kl", top_k=5))
    assert not can_fuse(torch.nn.Linear(16, 50), head_t, kd)  # a head with a bias
    assert not can_fuse(head_s, head_t, KDSpec(fused=False))

# ---- the KD trainer (kd.KDTrainer): packing, schedules, fused vs chunked ------------------------------

TRAIN_ROWS = [
    {"prompt": "What is (1+2)*3?", "response": "<think>\n1+2=3\n3*3=9\n</think>\n\n\\boxed{9}", "answer": "9"},
    {"prompt": "What is (4+4)*2?", "response": "<think>\n4+4=8\n8*2=16\n</think>\n\nThe answer is \\boxed{16}.", "answer": "16"},
    {"prompt": "What is 7?", "response": "\\boxed{7}", "answer": "7"},
]


def _kd_trainer(tmp_path, tokenizer, collator, **kw):
    from reasoning_qat.data.reasoning import ReasoningSFTDataset
    from reasoning_qat.kd import KDTrainer
    from reasoning_qat.training import quiet_training_args

    student, teacher = tiny_qwen3(vocab_size=len(tokenizer)), tiny_qwen3(vocab_size=len(tokenizer), seed=1)
    swap_in_fake_quant(student, QuantTargets(QuantScheme(2, 32)))
    args = quiet_training_args(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, save_strategy="no", **kw)
    ds = ReasoningSFTDataset(TRAIN_ROWS, tokenizer, 128)
    return KDTrainer(model=student, args=args, train_dataset=ds, data_collator=collator, teacher=teacher,
                     kd=KDSpec(loss="forward_kl", chunk_size=7)), ds


@pytest.mark.parametrize("loss", ["forward_kl", "ce"])
def test_packed_batch_gives_the_padded_batch_loss(tmp_path, tokenizer, loss):
    """Packing must not let an example see its neighbours or predict across a boundary: the loss on
    one flattened row equals the loss on the padded batch."""
    from reasoning_qat.stages.qat import qat_collator

    trainer, ds = _kd_trainer(tmp_path, tokenizer, None)
    trainer.kd = KDSpec(loss=loss, chunk_size=7)
    examples = [ds[i] for i in range(len(ds))]
    padded = qat_collator(False, tokenizer.pad_token_id)(examples)
    packed = qat_collator(True, tokenizer.pad_token_id)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert int(packed["input_ids"].numel()) == sum(len(e["input_ids"]) for e in examples)  # no padding
    with torch.no_grad():
        a = trainer.compute_loss(trainer.model, padded)
        b = trainer.compute_loss(trainer.model, packed)
        # Without the per-example position ids the model sees one long sequence: a different loss.
        c = trainer.compute_loss(trainer.model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    assert abs(c.item() - a.item()) > 1e-4


def test_wsd_schedule_warms_up_holds_then_decays(tmp_path, tokenizer):
    from reasoning_qat.stages.qat import qat_collator, qat_training_args

    q = QATConfig(max_steps=10, lr=1e-3, schedule="wsd", warmup_ratio=0.2, decay_ratio=0.3, logging_steps=1, save_steps=100)
    args = qat_training_args(q, tmp_path, seed=0)
    trainer, _ = _kd_trainer(tmp_path, tokenizer, qat_collator(False, tokenizer.pad_token_id))
    trainer.args = args
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) == 10
    # The Trainer logs the rate each step used: 2 warmup steps, 6 stable, then the decay.
    assert lrs[:2] == [0.0, pytest.approx(5e-4)]
    assert all(v == pytest.approx(1e-3) for v in lrs[2:8])
    assert 1e-3 > lrs[8] > lrs[9] > 0


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "ce"])
def test_fused_and_chunked_losses_train_the_same_student(tmp_path, tokenizer, loss):
    """The trainer takes the fused loss by default (kd.fused) and the checkpointed chunked one with
    fused: false; five real optimizer steps log the same losses and end at the same latent weights."""
    from reasoning_qat.stages.qat import qat_collator

    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        trainer, _ = _kd_trainer(tmp_path / str(fused), tokenizer, qat_collator(False, tokenizer.pad_token_id))
        trainer.kd = KDSpec(loss=loss, temperature=2.0, chunk_size=7, fused=fused)
        trainer.args.max_steps, trainer.args.logging_steps, trainer.args.learning_rate = 5, 1, 1e-3
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        runs[fused] = losses, weights
    assert len(runs[True][0]) == 5
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][0][0] != pytest.approx(runs[True][0][-1], rel=1e-3)  # it did train
    diff = (runs[True][1] - runs[False][1]).abs()
    assert diff.max() < 2e-4 and diff.mean() < 5e-7, (diff.max(), diff.mean())  # Adam amplifies float noise of ~0 gradients



def test_teacher_placement_shards_what_fits_and_offloads_what_does_not():
    """FSDP2's teacher goes sharded when its shard beside the student's fits a GPU, else to CPU memory;
    more GPUs make the shards smaller, so a teacher offloaded on one GPU is sharded over several."""
    from reasoning_qat.kd import choose_teacher_placement

    teacher, student = tiny_qwen3(seed=1), tiny_qwen3(seed=2).float()
    one = choose_teacher_placement(teacher, student, 1, 2**40)
    assert one[0] == "shard" and one[1]["teacher_bytes_per_gpu"] > 0 and one[1]["gpu_bytes"] == 2**40
    # a GPU just too small for one process's whole teacher and student, but large enough for half of each
    need = {w: sum(choose_teacher_placement(teacher, student, w, 2**40)[1][k]
                   for k in ("teacher_bytes_per_gpu", "student_bytes_per_gpu")) for w in (1, 2)}
    assert need[2] < need[1]
    gpu = int((need[1] + need[2]) / 2 / 0.9)
    assert choose_teacher_placement(teacher, student, 1, gpu)[0] == "offload"
    assert choose_teacher_placement(teacher, student, 2, gpu)[0] == "shard"
    assert choose_teacher_placement(teacher, student, 2, gpu, "offload")[0] == "offload"
    assert choose_teacher_placement(teacher, student, 1, gpu, "shard")[0] == "shard"
    with pytest.raises(ValueError, match="one of auto, shard, offload"):
        choose_teacher_placement(teacher, student, 1, gpu, "gpu")


def test_teacher_placement_other_than_auto_needs_fsdp2():
    with pytest.raises(ValueError, match="kd.teacher_placement: offload places the teacher's FSDP2 shards"):
        QATConfig(kd={"teacher_placement": "offload"})
    assert QATConfig(kd={"teacher_placement": "offload"}, distributed="fsdp2").kd.teacher_placement == "offload"
