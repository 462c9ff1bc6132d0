"""The chunked KD loss equals the naive full-logits loss, in value and in gradients."""

import pytest
import torch

from reasoning_qat.kd import KDSpec, chunked_distill_loss, forward_kl, jsd, naive_distill_loss, reverse_kl


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
