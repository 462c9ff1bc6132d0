"""The cached teacher: forward KL against top-k log-probabilities plus the tail mass is the KL
of the two distributions coarse-grained to k + 1 outcomes; the cache written by data/teacher_cache.py holds what
the teacher computes, resumes by shard, and feeds the loss the rows of the positions it reads; the qat stage
trains from it without loading the teacher."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from reasoning_qat.data.reasoning import PadCollator
from reasoning_qat.data.teacher_cache import (
    CachedTeacherCollator,
    CachedTeacherDataset,
    TeacherCache,
    top_k_with_tail,
    write_teacher_cache,
)
from reasoning_qat.kd import KDSpec, batch_loss, cached_forward_kl, forward_kl

from ..conftest import demo_recipe, tiny_qwen3


def _coarse_kl(s_logits, t_logits, k, T):
    """Independent reference: both distributions summed into k + 1 buckets (the teacher's top-k tokens, the
    rest), then KL(teacher || student) of the buckets."""
    p = (t_logits / T).softmax(-1).double()
    q = (s_logits / T).softmax(-1).double()
    idx = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)], -1)
    q_b = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
    terms = torch.where(p_b > 0, p_b * (p_b.log() - q_b.log()), 0.0)
    return terms.sum() * T**2


@pytest.mark.parametrize("k", [1, 5, 30, 50])
def test_cached_forward_kl_is_the_kl_of_k_plus_1_buckets(k):
    torch.manual_seed(k)
    s, t, T = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50) * 3, 1.5
    values, indices, tail = top_k_with_tail(t, k, T)
    value = cached_forward_kl(s, values, indices, tail, T)
    assert value.item() == pytest.approx(_coarse_kl(s.detach(), t, k, T).item(), rel=1e-4, abs=1e-6)
    full = forward_kl(s, t, T)
    assert value.item() <= full.item() + 1e-5  # coarse-graining never adds divergence
    if k == 50:  # the whole vocabulary: the full forward KL, and a finite gradient through the -inf tail
        assert torch.isinf(tail).all() and value.item() == pytest.approx(full.item(), rel=1e-5)
    (g,) = torch.autograd.grad(value, s)
    assert torch.isfinite(g).all()
    assert cached_forward_kl(t, values, indices, tail, T).item() == pytest.approx(0, abs=1e-5)  # zero at the teacher


def _rows(n=5, vocab=102, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 9 + i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * (3 + i % 2) + ids[3 + i % 2 :]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_the_cache_holds_what_the_teacher_computes_and_resumes(tmp_path):
    teacher = tiny_qwen3(seed=3)
    rows = _rows()
    manifest = write_teacher_cache(teacher, rows, tmp_path / "c", top_k=7, temperature=2.0, batch_size=2,
                                   chunk_size=3, shard_examples=2, progress=False)
    assert manifest["shards"] == 3 and manifest["examples"] == 5 and manifest["top_k"] == 7
    assert manifest["rows"] == sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)
    assert manifest["bytes_per_token"] > 7 * 6  # float16 values and int32 ids per kept token, plus the tail
    cache = TeacherCache(tmp_path / "c")
    with torch.no_grad():
        for i, r in enumerate(rows):
            logits = teacher(torch.tensor([r["input_ids"]])).logits[0]
            pos = [t for t in range(len(r["labels"]) - 1) if r["labels"][t + 1] != -100]
            ref = top_k_with_tail(logits[pos], 7, 2.0)
            got = cache.rows(i)
            assert torch.equal(got[1], ref[1])
            assert torch.allclose(got[0], ref[0], atol=2e-3) and torch.allclose(got[2], ref[2], atol=1e-4)
    # killed after the first shards: the re-run keeps them and writes the rest
    first = (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    (tmp_path / "c" / "manifest.json").unlink()
    again = write_teacher_cache(teacher, rows, tmp_path / "c", top_k=7, temperature=2.0, batch_size=2,
                                chunk_size=3, shard_examples=2, progress=False)
    assert (tmp_path / "c" / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert again["rows"] == manifest["rows"]


@pytest.mark.parametrize("packing", [False, True])
def test_a_full_vocabulary_cache_gives_the_online_loss(tmp_path, packing):
    """The collated rows line up with the positions the loss reads (padded and packed batches): with k = the
    vocabulary the cached loss is the online forward KL, in value and in gradient."""
    from transformers import DataCollatorWithFlattening

    teacher, student = tiny_qwen3(seed=3), tiny_qwen3(seed=4)
    rows = _rows()
    write_teacher_cache(teacher, rows, tmp_path / "c", top_k=102, batch_size=2, shard_examples=2, progress=False)
    base = DataCollatorWithFlattening(return_position_ids=True) if packing else PadCollator(0)
    data = CachedTeacherDataset(rows, TeacherCache(tmp_path / "c"))
    cached = CachedTeacherCollator(base)([data[i] for i in range(5)])
    online = base([dict(r) for r in rows])
    kd = KDSpec(chunk_size=4)
    a = batch_loss(student, None, cached, kd)
    (ga,) = torch.autograd.grad(a, [student.model.layers[0].mlp.up_proj.weight])
    b = batch_loss(student, teacher, online, kd)
    (gb,) = torch.autograd.grad(b, [student.model.layers[0].mlp.up_proj.weight])
    assert a.item() == pytest.approx(b.item(), rel=2e-3)  # float16 log-probabilities on disk
    assert torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.999


def test_a_cache_of_another_set_is_refused(tmp_path):
    from reasoning_qat.errors import UserError

    write_teacher_cache(tiny_qwen3(), _rows(4), tmp_path / "c", top_k=4, progress=False)
    with pytest.raises(UserError, match="holds 4 examples, the QAT set 5; re-run the calibrate stage"):
        CachedTeacherDataset(_rows(5), TeacherCache(tmp_path / "c"))


def test_the_recipe_refuses_a_cached_teacher_for_other_losses(tmp_path):
    from reasoning_qat.recipe import RecipeError, load_recipe

    path = demo_recipe(tmp_path)
    r = yaml.safe_load(path.read_text())
    r["qat"]["kd"] = {"teacher": "cached", "loss": "jsd"}
    path.write_text(yaml.safe_dump(r))
    with pytest.raises(RecipeError, match="qat.kd: teacher: cached .* loss jsd needs the online teacher"):
        load_recipe(path)
    r["qat"]["kd"] = {"teacher": "cached", "cache_backend": "vllm", "temperature": 2.0}
    path.write_text(yaml.safe_dump(r))
    with pytest.raises(RecipeError, match="qat.kd: cache_backend: vllm reports log-probabilities at temperature 1"):
        load_recipe(path)


@pytest.mark.slow
def test_the_qat_stage_trains_from_the_cache_without_a_teacher(tmp_path):
    """The demo at W2: QAT from a full-vocabulary cache follows the online run's losses; the calibrate manifest
    records the cache's size and speed; the qat metrics say the loss read the cache."""
    runs = {}
    for name, kd in (("online", {}), ("cached", {"teacher": "cached", "cache_top_k": 102})):
        path = demo_recipe(tmp_path, name=name, shared_teacher=True)
        r = yaml.safe_load(path.read_text())
        r["qat"]["kd"] = kd
        path.write_text(yaml.safe_dump(r))
        out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(path), "--stages",
                              "teacher,calibrate,ptq,qat"], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = tmp_path / "runs" / name

    def losses(run):
        return [h["loss"] for h in json.loads((run / "qat" / "w2-qat" / "log_history.json").read_text()) if "loss" in h]

    calib = json.loads((runs["cached"] / "calibrate" / "manifest.json").read_text())["metrics"]["teacher_cache"]
    assert calib["top_k"] == 102 and calib["rows"] > 0 and calib["bytes_per_token"] > 0
    assert "teacher_cache" not in json.loads((runs["online"] / "calibrate" / "manifest.json").read_text())["metrics"]
    assert json.loads((runs["cached"] / "qat" / "w2-qat" / "qat_metrics.json").read_text())["kd_path"] == ["cached"]
    assert losses(runs["cached"]) == pytest.approx(losses(runs["online"]), rel=2e-2)
