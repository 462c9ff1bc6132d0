"""QAT data and launch: packing, teacher-written responses, the WSD schedule, several processes."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from reasoning_qat.data.teacher_responses import GenerationSpec
from reasoning_qat.kd import KDSpec
from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.recipe import QATConfig

from .conftest import tiny_qwen3, write_recipe

ROWS = [
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
    ds = ReasoningSFTDataset(ROWS, tokenizer, 128)
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


class _Echo:
    """A deterministic 'backend' for the resume test: answers every prompt with its own text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, k, temperature, top_p, top_k, max_new_tokens, seed=0, keys=None):
        from reasoning_qat.evaluation.backends import Completion

        self.calls += 1
        return [[Completion(f"<think>\n{seed}\n</think>\n\n\\boxed{{0}}", 5, False)] for p in prompts]


def test_teacher_responses_resume_after_a_torn_write(tmp_path, tokenizer):
    from reasoning_qat.data.teacher_responses import generate_teacher_responses

    rows = [{"prompt": f"q{i}", "response": "", "answer": str(i % 2)} for i in range(7)]
    gen = GenerationSpec(batch_size=3, keep="correct")
    full = tmp_path / "full.jsonl"
    kept_full = generate_teacher_responses(_Echo(tokenizer), rows, full, gen, seed=5)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 7
    assert [r["prompt"] for r in kept_full] == ["q0", "q2", "q4", "q6"]  # keep: correct drops the wrong ones

    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:3]) + lines[3][:10])  # one batch done, the next torn mid-line
    echo = _Echo(tokenizer)
    kept_cut = generate_teacher_responses(echo, rows, cut, gen, seed=5)
    assert echo.calls == 2  # rows 3-5 and 6 only
    assert cut.read_text() == full.read_text() and kept_cut == kept_full


def test_teacher_responses_from_a_real_model(tmp_path, tokenizer):
    from reasoning_qat.data.teacher_responses import generate_teacher_responses
    from reasoning_qat.evaluation.backends import TransformersBackend

    engine = TransformersBackend.from_model(tiny_qwen3(vocab_size=len(tokenizer)), tokenizer, batch_size=2)
    gen = GenerationSpec(batch_size=2, max_new_tokens=6, temperature=0.0)
    kept = generate_teacher_responses(engine, ROWS, tmp_path / "t.jsonl", gen)
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in ROWS]
    written = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(w["truncated"] for w in written)  # a random model never ends its turn in 6 tokens
    with pytest.raises(ValueError, match="no teacher response was kept"):
        generate_teacher_responses(engine, ROWS, tmp_path / "f.jsonl", dataclasses.replace(gen, keep="finished"))


MP_RECIPE = """
name: {name}
run_root: {root}
model:
  demo: {{hidden_size: 64, intermediate_size: 128, num_layers: 2, train_steps: 30, batch_size: 32, lr: 3.0e-3}}
  dtype: float32
quant: {{bits: [2], group_size: 32}}
calibration: {{num_samples: 8, seq_len: 128}}
ptq: {{method: gptq, baselines: []}}
qat:
  data: {{source: demo, max_samples: 64, responses: {responses}, generation: {{batch_size: 32, max_new_tokens: 80, temperature: 0}}}}
  max_steps: {steps}
  batch_size: 8
  save_steps: {save}
  logging_steps: 1
  num_processes: {procs}
  packing: {packing}
export: {{formats: [dequantized]}}
eval: {{tasks: [demo_arith], backend: transformers, limit: 10}}
"""


@pytest.mark.slow
def test_two_process_qat_with_checkpoints_and_teacher_data(tmp_path):
    """Two CPU processes (gloo DDP) train on teacher-written, packed data and checkpoint mid-run."""
    rec = write_recipe(tmp_path / "mp.yaml", MP_RECIPE.format(name="mp", root=tmp_path / "runs", responses="teacher",
                                                                procs=2, packing="true", steps=6, save=3))
    out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate,ptq,qat"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "mp"
    written = [json.loads(x) for x in (run / "calibrate" / "qat_data.jsonl").read_text().splitlines()]
    assert len(written) == 64 and all(w["response"] for w in written)
    assert json.loads((run / "calibrate" / "manifest.json").read_text())["metrics"]["qat_data"]["teacher_responses"]["rows"] == 64
    log = json.loads((run / "qat" / "w2-qat" / "log_history.json").read_text())
    steps = [h for h in log if "loss" in h and not h.get("initial")]  # step 0: the initialisation's loss
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    # Data parallel: each step consumes batch_size examples on each of the 2 ranks.
    assert steps[-1]["epoch"] == pytest.approx(6 * 8 * 2 / 64)
    assert not list((run / "qat" / "w2-qat" / "trainer").glob("checkpoint-*"))  # cleaned after success
    from reasoning_qat.quant.formats import read_quantized_weights

    qws, _, meta = read_quantized_weights(run / "qat" / "w2-qat" / "model")
    assert meta["bits"] == 2 and len(qws) == 2 * 7  # every Linear of both blocks, saved once by rank 0


@pytest.mark.slow
def test_two_process_qat_killed_then_resumed(tmp_path):
    """SIGKILL of `rqat run` must take the launched workers down too (they run in sessions of their
    own), keep the checkpoint, and the re-run must continue from it to the uninterrupted result."""
    cli = [sys.executable, "-m", "reasoning_qat.cli", "run"]
    fmt = dict(root=tmp_path / "runs", responses="dataset", procs=2, packing="false", steps=15, save=5)
    straight = write_recipe(tmp_path / "a.yaml", MP_RECIPE.format(name="a", **fmt))
    subprocess.run([*cli, str(straight), "--stages", "teacher,calibrate,ptq,qat"], check=True, capture_output=True)

    rec = write_recipe(tmp_path / "b.yaml", MP_RECIPE.format(name="b", **fmt))
    run = tmp_path / "runs" / "b"
    for stage in ("teacher", "calibrate", "ptq"):  # the same recipe hashes: run b takes them as done
        shutil.copytree(tmp_path / "runs" / "a" / stage, run / stage)
    proc = subprocess.Popen([*cli, str(rec), "--stages", "qat"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = run / ".qat.partial" / "w2-qat" / "trainer" / "checkpoint-5" / "trainer_state.json"
    deadline = time.time() + 900  # a bound, not a wait: 2 test workers share 2 cores
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), "QAT never wrote its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    time.sleep(3)  # the workers notice their launcher is gone within a second
    workers = subprocess.run(["pgrep", "-f", f"reasoning_qat.stages.qat --run-dir {run}"], capture_output=True, text=True)
    assert workers.stdout.strip() == ""
    assert not (run / ".qat.partial" / "w2-qat" / ".done").exists()

    out = subprocess.run([*cli, str(rec), "--stages", "qat"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stdout

    def losses(name):
        log = json.loads((tmp_path / "runs" / name / "qat" / "w2-qat" / "log_history.json").read_text())
        return [h["loss"] for h in log if "loss" in h and not h.get("initial")]

    assert len(losses("b")) == 15
    assert losses("b")[-1] == pytest.approx(losses("a")[-1], rel=1e-5)


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


def test_demo_teacher_schedule_and_weight_averaging(tmp_path):
    """model.demo.schedule / averaging: a WSD teacher holds its peak rate, then decays; LAWA averages
    its last snapshots into the saved teacher."""
    from reasoning_qat.pipeline import Pipeline
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages import STAGES

    from .conftest import demo_recipe

    teachers = {}
    for name, extra in (("wsdlawa", "schedule: wsd, decay_ratio: 0.25, averaging: lawa, lawa_k: 3, lawa_interval: 10, "),
                        ("wsd", "schedule: wsd, decay_ratio: 0.25, ")):
        rec = demo_recipe(tmp_path, name=name, teacher_steps=40)
        rec.write_text(rec.read_text().replace("demo: {hidden_size: 64,", "demo: {" + extra + "hidden_size: 64,"))
        Pipeline(load_recipe(rec), STAGES).run(["teacher"])
        m = json.loads((tmp_path / "runs" / name / "teacher" / "manifest.json").read_text())["metrics"]
        teachers[name] = m
        lrs = m["learning_rates"]
        assert m["schedule"] == "wsd" and max(lrs) == pytest.approx(3e-3)
        stable = [lr for lr in lrs if lr == pytest.approx(3e-3)]
        assert len(stable) >= len(lrs) // 2 and lrs[-1] < 3e-3  # held at the peak, then decayed
    assert teachers["wsdlawa"]["averaged_snapshots"] == 3 and teachers["wsd"]["averaged_snapshots"] == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "runs" / "wsdlawa" / "teacher" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "wsd" / "teacher" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same training, averaged weights saved
