"""research/organism/organism_table.py: seeds pooled per problem, and the findings' reading."""

import importlib.util
import math

from .conftest import ROOT, NaNBackward


def _entry(problems: dict) -> dict:
    """A table entry of per-problem scores (no interval of its own: compare_rows pairs them)."""
    return {"mean": sum(problems.values()) / len(problems), "ci": 0.0, "problems": problems}


def _module():
    spec = importlib.util.spec_from_file_location("organism_table", ROOT / "research" / "organism" / "organism_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seeds_pool_per_problem():
    t = _module()
    seed0 = {"a": [1], "b": [0], "c": [1], "d": [1]}
    seed1 = {"a": [1], "b": [1], "c": [0], "d": [1]}
    mean, ci = t.mean_ci(list(t.per_problem_means([seed0, seed1]).values()))
    vals = [1.0, 0.5, 0.5, 1.0]  # each problem's mean over the two seeds
    sd = math.sqrt(sum((v - 0.75) ** 2 for v in vals) / 3)
    assert mean == 0.75 and abs(ci - 1.96 * sd / 2) < 1e-12


def test_a_difference_inside_the_combined_interval_is_not_separated():
    t = _module()
    assert t.compare_rows({"mean": 0.95, "ci": 0.01}, {"mean": 0.90, "ci": 0.01}).endswith("holds")
    assert t.compare_rows({"mean": 0.90, "ci": 0.01}, {"mean": 0.95, "ci": 0.01}).endswith("reversed")
    assert t.compare_rows({"mean": 0.95, "ci": 0.04}, {"mean": 0.93, "ci": 0.04}).endswith("not separated")
    assert t.compare_rows(None, {"mean": 0.9, "ci": 0.0}) == "not measured"


def test_rows_scored_on_the_same_problems_are_compared_paired():
    """Two rows that differ on 5 of 100 problems: side by side their intervals overlap (0.50 vs
    0.45, each ±0.10), but the per-problem differences separate them."""
    t = _module()
    a = {str(i): 1.0 if i < 50 else 0.0 for i in range(100)}
    b = {**a, **{str(i): 0.0 for i in range(5)}}
    ra = {"mean": 0.50, "ci": t.mean_ci(list(a.values()))[1], "problems": a}
    rb = {"mean": 0.45, "ci": t.mean_ci(list(b.values()))[1], "problems": b}
    assert t.compare_rows({**ra, "problems": None}, rb).endswith("not separated")
    paired = t.compare_rows(ra, rb)
    assert "paired over 100 problems" in paired and paired.endswith("holds")
    sd = math.sqrt(5 * 0.95**2 + 95 * 0.05**2) / math.sqrt(99)
    assert f"+0.050 (±{1.96 * sd / 10:.3f}" in paired


def test_variant_overrides_set_nested_keys_parsed_as_yaml():
    spec = importlib.util.spec_from_file_location("organism_runs", ROOT / "research" / "organism" / "organism_runs.py")
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    base = {"name": "o", "qat": {"kd": {"loss": "forward_kl"}}, "eval": {"tasks": ["demo_arith"]}}
    out = runs.apply_overrides(base, ["qat.kd.loss=ce", "eval.methods=[qat]", "rl.enabled=false", "seed=1"])
    assert out == {"name": "o", "qat": {"kd": {"loss": "ce"}}, "eval": {"tasks": ["demo_arith"], "methods": ["qat"]},
                   "rl": {"enabled": False}, "seed": 1}
    assert base["qat"]["kd"]["loss"] == "forward_kl"  # the base recipe is left as it was


def _manifest(path, metrics):
    import json

    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"status": "done", "metrics": metrics}))


def test_schemes_are_columns_and_an_unfinished_eval_gives_the_variants_it_finished(tmp_path):
    """A W4A4KV4 run's variants go to their own column (not into W4 weight-only), and a run whose
    eval stage was cut off contributes the variants it finished, marked."""
    import json

    t = _module()
    a4 = {"rotation": "hadamard", "activations": 4, "kv_cache": 4}
    done, cut = tmp_path / "ptq0", tmp_path / "akd0"
    _manifest(done / "ptq", {"w3-rtn": {"rotation": "none"}})
    _manifest(done / "eval", {"bf16": {"demo_arith": {"pass@1": 0.99, "ci95": 0.01, "ce": 1e-3}},
                              "w3-rtn": {"demo_arith": {"pass@1": 0.95, "ci95": 0.02, "ce": 2e-3}}})
    _manifest(cut / "ptq", {"w4-gptq": a4})
    _manifest(cut / "qat", {"w4-qat": {"loss": "forward_kl", "init": "ptq"}})
    finished = cut / ".eval.partial" / "w4-qat" / "demo_arith"
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"pass@1": 0.9, "ci95": 0.03}))
    (finished / "ce.json").write_text(json.dumps({"ce": 5e-3}))
    (cut / ".eval.partial" / "w4-qat_rl" / "demo_arith").mkdir(parents=True)  # cut off: no metrics yet
    table = t.build([done, cut], {})
    w4a4 = (4, "Hadamard, A4, KV4")
    assert set(table) == {("BF16", (16, "")), ("RTN", (3, "")), ("KD-QAT", w4a4)}
    assert table[("KD-QAT", w4a4)]["unfinished"] and table[("KD-QAT", w4a4)]["ce"] == 5e-3
    assert not table[("RTN", (3, ""))]["unfinished"] and table[("RTN", (3, ""))]["mean"] == 0.95
    assert t.scheme(w4a4, 128) == "W4A4KV4G128 (Hadamard)" and t.scheme((3, ""), 128) == "W3G128"
    assert t.scheme((2, ""), -1) == "W2 per-channel"
    assert t.cell(table[("KD-QAT", w4a4)]).endswith("†") and "†" not in t.cell(table[("RTN", (3, ""))])
    assert "combines the runs' own" in t.unfinished_note(table)
    # with the cut-off variant's per-problem data (bg.sh's correctness.json) its interval is pooled per problem
    rows = [[i, 0, int(i % 10 != 0)] for i in range(20)]
    pooled = t.build([done, cut], {"akd0/w4-qat/demo_arith": rows})
    assert pooled[("KD-QAT", w4a4)]["mean"] == 0.9 and pooled[("KD-QAT", w4a4)]["problems"] is not None
    assert "pooled per problem" in t.unfinished_note(pooled) and t.unfinished_note({}) == ""


def test_table_runs_are_named_after_their_teacher_and_share_it():
    """organism_table_runs.sh: every variant trains on the same teacher length (the recipe's, or
    TEACHER_STEPS) and, with kd0 listed, waits for kd0's teacher; without kd0 it copies that run's."""
    import os
    import subprocess

    base_env = {k: v for k, v in os.environ.items() if k != "TEACHER_STEPS"}

    def args(*variants, **env):
        out = subprocess.run(["bash", "research/organism/organism_table_runs.sh", *variants], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**base_env, **env}).stdout
        return out.split()

    a = args("kd0", "ace1", TEACHER_STEPS="300")
    assert a[a.index("--out") + 1] == "research/organism/table-t300"
    variants = [a[i + 1] for i, x in enumerate(a) if x == "--variant"]
    assert variants == ["t300-kd0", "t300-ace1"]
    assert a.count("model.demo.train_steps=300") == 2
    assert a[a.index("--share") + 1 : a.index("--share") + 3] == ["t300-ace1", "t300-kd0"]
    assert "seed=1" in a and "quant.preset=w4a4kv4" in a

    import yaml

    steps = yaml.safe_load((ROOT / "recipes" / "organism-gpu.yaml").read_text())["model"]["demo"]["train_steps"]
    b = args("ptq1")
    assert "--share" not in b and b[b.index("--teacher-from") + 1] == f"runs/organism-gpu-t{steps}-kd0"


def test_named_pairs_are_read_in_every_column():
    """--pair A B adds 'A vs B' to each column's findings; BF16 (one column of its own) pairs with any."""
    t = _module()
    a = {str(i): 1.0 for i in range(100)}
    b = {**a, **{str(i): 0.0 for i in range(20)}}
    table = {("KD-QAT (compact traces)", (2, "")): _entry(a), ("CE-QAT (compact traces)", (2, "")): _entry(b),
             ("BF16", (16, "")): _entry(b)}
    lines = t.findings(table, [(2, "")], 128, [("KD-QAT (compact traces)", "CE-QAT (compact traces)"),
                                               ("BF16", "KD-QAT (compact traces)"), ("KD-QAT", "CE-QAT")])
    text = "\n".join(lines)
    assert "- KD-QAT (compact traces) vs CE-QAT (compact traces): 1.000 vs 0.800: +0.200" in text and "holds" in text
    assert "- BF16 vs KD-QAT (compact traces): 0.800 vs 1.000: -0.200" in text and "reversed" in text
    assert "- KD-QAT vs CE-QAT:" not in text  # neither row measured: no line


def test_dynamics_table_pairs_each_teacher_seed_with_its_own_problems():
    """research/organism/dynamics_table.py on the recorded schedule runs (table-dyn350): each teacher seed draws its
    own problems, so problem 7 of seed 0 and of seed 1 are two problems, and the pass@1 drop of one schedule
    minus another's pairs the same seed's problems; cosine teachers trained for 350, 400 and 450 steps (to meet
    WSD's validation loss) are rows of their own. Checked against the per-problem outcomes."""
    import gzip
    import json

    spec = importlib.util.spec_from_file_location("dynamics_table", ROOT / "research" / "organism" / "dynamics_table.py")
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    d = ROOT / "research" / "organism" / "table-dyn350"
    with gzip.open(d / "correctness.json.gz") as f:
        correctness = json.load(f)
    lines = t.build(sorted((d / "runs").glob("organism-gpu-dyn350-*")), correctness, bits=3)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    teachers = ["cosine, 350 steps", "cosine, 400 steps", "cosine, 450 steps", "WSD, 350 steps",
                "WSD + LAWA, 350 steps"]
    assert [k for k in rows if k in teachers] == teachers

    def outcomes(run, variant):  # {(seed, problem): 0/1}, one sample per problem
        seed = int(run[-1])
        return {(seed, pid): ok for pid, _, ok in correctness[f"organism-gpu-dyn350-{run}/{variant}/demo_arith"]}

    def drop(kind):
        bf16 = {**outcomes(f"{kind}0", "bf16"), **outcomes(f"{kind}1", "bf16")}
        rtn = {**outcomes(f"{kind}0", "w3-rtn"), **outcomes(f"{kind}1", "w3-rtn")}
        return {p: bf16[p] - rtn[p] for p in bf16}

    cos, cos450, wsd = drop("dcos"), drop("dcos450s"), drop("dwsd")
    assert len(cos) == 2400  # 1,200 problems per seed, none merged across seeds
    assert rows["cosine, 350 steps"][6].startswith(f"{sum(cos.values()) / len(cos):+.3f} ± ")
    assert rows["cosine, 450 steps"][6].startswith(f"{sum(cos450.values()) / len(cos450):+.3f} ± ")
    diff = sum(wsd[p] - cos[p] for p in cos) / len(cos)
    assert rows["WSD, 350 steps - cosine, 350 steps"][1].startswith(f"{diff:+.3f} ± ")
    diff = sum(wsd[p] - cos450[p] for p in cos450) / len(cos450)
    assert rows["WSD, 350 steps - cosine, 450 steps"][1].startswith(f"{diff:+.3f} ± ")


def test_budget_rows_carry_the_rl_settings_a_run_changed():
    """--tag-steps on the recorded table-t350b runs: GRPO rows of another `rl.latent_lr` than the organism
    recipe's, or run with eager attention, are rows of their own instead of pooling with the recipe's (the
    e20lr1 runs collapsed to 0.000; pooled, they would have halved the 20-step row)."""
    import gzip
    import json

    t = _module()
    d = ROOT / "research" / "organism" / "table-t350b"
    with gzip.open(d / "correctness.json.gz") as f:
        correctness = json.load(f)
    table = t.build(sorted((d / "runs").glob("organism-gpu-t350b-*")), correctness, tag_steps=True)
    w2, w3 = (2, ""), (3, "")
    lr = table[("KD-QAT + RL [QAT 30 steps, RL 20 steps, RL latent lr 0.1]", w2)]
    recipe_lr = table[("KD-QAT + RL [QAT 30 steps, RL 20 steps]", w2)]
    assert lr["seeds"] == 1 and lr["mean"] < 0.01  # only e20lr1s1 finished its eval
    assert recipe_lr["seeds"] == 2 and recipe_lr["mean"] > 0.7  # e20s0 and e20s1
    assert table[("RL from RTN [RL 20 steps, eager attention]", w3)]["seeds"] == 1
    assert table[("RL from RTN [RL 20 steps]", w3)]["seeds"] == 1


def test_cosine_teachers_of_another_length_are_dynamics_variants():
    """organism_table_runs.sh dcosNsK: the cosine teacher trained for N steps (the later override wins) with
    teacher seed K, training its own teacher (no --teacher-from, no shared teacher)."""
    import subprocess

    out = subprocess.run(["bash", "research/organism/organism_table_runs.sh", "dcos450s1"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"TAG": "dyn350-", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[out.index("--variant") + 1] == "dyn350-dcos450s1"
    steps = [x for x in out if x.startswith("model.demo.train_steps=")]
    assert steps[-1] == "model.demo.train_steps=450" and "model.demo.seed=1" in out
    assert "--teacher-from" not in out and "--share" not in out and "seed=1" not in out


def test_a_rotated_column_beside_the_plain_one_compares_their_rtn_rows():
    """A table holding W4A4KV4 with and without the Hadamard rotation gets one more line: the rotation's own
    effect on RTN, paired per problem; a table with only the rotated column gets none."""
    t = _module()
    plain = {str(i): float(i < 50) for i in range(100)}
    rotated = {str(i): float(i < 70) for i in range(100)}
    cols = [(4, "Hadamard, A4, KV4"), (4, "A4, KV4")]
    table = {("RTN", cols[0]): _entry(rotated), ("RTN", cols[1]): _entry(plain)}
    text = "\n".join(t.findings(table, cols))
    assert "**W4A4KV4G128 (Hadamard) vs W4A4KV4G128**" in text
    line = next(x for x in text.splitlines() if x.startswith("- the rotation helps RTN"))
    assert "0.700 vs 0.500: +0.200" in line and "paired over 100 problems" in line and "holds" in line
    assert "the rotation helps RTN" not in "\n".join(t.findings(table, cols[:1]))


def test_plain_rtn_and_latent_rate_variants():
    """organism_table_runs.sh: artnK is W4A4KV4 RTN without the rotation (its ptq.rotation=none comes after the
    column's hadamard, and the later override wins), without BF16 (the W3/W2 runs evaluate it); eNlrXsK is eNsK
    at rl.latent_lr X; af32rtnK is the rotated RTN evaluated in float32."""
    import subprocess

    out = subprocess.run(["bash", "research/organism/organism_table_runs.sh", "artn0", "e60lr3e-2s1"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"TAG": "t350c-", "SOURCE": "artn0",
                                                              "PATH": "/usr/bin:/bin"}).stdout.split()
    first = out[out.index("--variant"):out.index("--variant", out.index("--variant") + 1)]
    second = out[out.index("--variant", out.index("--variant") + 1):]
    assert first[1] == "t350c-artn0" and "quant.preset=w4a4kv4" in first
    assert [x for x in first if x.startswith("ptq.rotation=")][-1] == "ptq.rotation=none"
    assert "eval.methods=[rtn]" in first and "ptq.method=rtn" in first
    assert second[1] == "t350c-e60lr3e-2s1" and "rl.max_steps=60" in second and "rl.latent_lr=3e-2" in second
    assert "qat.max_steps=30" in second and "seed=1" in second and "quant.bits=[2]" in second
    assert out[out.index("--share") + 1:out.index("--share") + 3] == ["t350c-e60lr3e-2s1", "t350c-artn0"]


def test_float32_eval_variant_and_its_own_row():
    """af32rtnK: the rotated RTN evaluated with eval.dtype=float32; the table gives an eval in another dtype than
    the recipe's a row of its own (the recorded table-t350d runs: af32rtn0/1 beside aptq0/1's RTN)."""
    import gzip
    import json
    import subprocess

    out = subprocess.run(["bash", "research/organism/organism_table_runs.sh", "af32rtn1"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"TAG": "t350d-", "SOURCE": "af32rtn1",
                                                              "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[out.index("--variant") + 1] == "t350d-af32rtn1"
    assert "eval.dtype=float32" in out and "eval.methods=[rtn]" in out and "seed=1" in out
    assert [x for x in out if x.startswith("ptq.rotation=")][-1] == "ptq.rotation=hadamard"

    t = _module()
    d = ROOT / "research" / "organism" / "table-t350d"
    with gzip.open(d / "correctness.json.gz") as f:
        correctness = json.load(f)
    runs = [d / "runs" / f"organism-gpu-t350d-{v}" for v in ("aptq0", "aptq1", "af32rtn0", "af32rtn1")]
    table = t.build(runs, correctness, tag_steps=True)
    col = (4, "Hadamard, A4, KV4")
    assert table[("RTN", col)]["seeds"] == 2 and table[("RTN [eval float32]", col)]["seeds"] == 2
    assert table[("RTN", col)]["problems"] != table[("RTN [eval float32]", col)]["problems"]


def test_rewards_are_read_from_a_cut_off_runs_progress_log(tmp_path, capsys):
    """research/organism/organism_rewards.py: one reward per step from carriage-return redraws, a resumed step's last
    line wins, NaN grad-norm steps are listed and a range's mean covers only the steps the log has."""
    spec = importlib.util.spec_from_file_location("organism_rewards", ROOT / "research" / "organism" / "organism_rewards.py")
    r = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(r)
    line = "rl w2: step {}/200 ({}%) | loss 0.01 | reward {} | grad norm {} | lr 1.00e-06 | 0.20 steps/s | ETA 0:10:00"
    log = tmp_path / "run.log"
    log.write_text("stage rl\n" + line.format(1, 0, 0.25, 0.1) + "\r" + line.format(2, 1, 0.5, "nan") + "\r"
                   + line.format(3, 1, 0.75, 0.2) + "\n" + "resumed\n" + line.format(3, 1, 1.0, 0.2) + "\n")
    steps = r.step_rewards(log)
    assert steps == {1: (0.25, "0.1"), 2: (0.5, "nan"), 3: (1.0, "0.2")}
    assert r.mean_reward(steps, 1, 2) == (0.375, 2) and r.mean_reward(steps, 3, 60) == (1.0, 1)
    assert r.mean_reward(steps, 61, 120) == (None, 0)
    r.main([str(log), "--ranges", "1-2", "61-120"])
    assert capsys.readouterr().out.strip() == ("run.log: last step 3, NaN grad norm at [2]; mean reward "
                                               "steps 1-2: 0.375 (n=2); steps 61-120: -")


def test_sdpa_nan_probe_finds_a_nan_query_gradient_and_its_gpu_signature(saved_tiny, tmp_path, monkeypatch):
    """research/organism/sdpa_cudnn_nan.py on CPU: the left-padded input has fully masked query rows (the GRPO
    micro-batch condition), every case is finite through CPU SDPA, and a NaN put into SDPA's query gradient alone
    (what cuDNN's backward returns, pytorch#196678) is found: in the kernel case grad_q only, in the model case
    every parameter below the top layer's query path, the signature of the GPU runs' skipped steps."""
    import json

    import torch

    spec = importlib.util.spec_from_file_location("sdpa_cudnn_nan", ROOT / "research" / "organism" / "sdpa_cudnn_nan.py")
    s = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s)
    q, *_, mask = s.kernel_inputs("left_padded", 192, "cpu")
    assert q.shape == (2, 4, 192, 64) and mask.shape == (2, 1, 192, 192)
    assert not mask[1, 0, :37].any() and mask[1, 0, 37:].any(-1).all() and mask[0, 0].any(-1).all()
    cases = s.main(["--model", str(saved_tiny), "--lengths", "192", "--out", str(tmp_path / "o.json")])
    assert {(c["part"], c.get("input"), c["mode"]) for c in cases} == {
        ("kernel", i, m) for i in ("low_lse", "left_padded") for m in ("default", "math")} | {
        ("model", None, "default"), ("model", None, "eager")}
    assert all(c.get("grad_q_nonfinite", 0) == 0 and c.get("nonfinite_parameters", 0) == 0 for c in cases)
    assert json.loads((tmp_path / "o.json").read_text())["cases"] == cases

    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: real(NaNBackward.apply(q), k, v, *a, **kw))
    kernel = s.kernel_case("left_padded", 192, "poisoned", s.nullcontext, "cpu")
    assert kernel["grad_q_nonfinite"] > 0 and kernel["grad_k_nonfinite"] == kernel["grad_v_nonfinite"] == 0
    model = s.model_case(str(saved_tiny), 192, "poisoned", s.nullcontext, "cpu")
    top = {f"model.layers.1.{n}.weight" for n in ("self_attn.q_proj", "self_attn.q_norm", "input_layernorm")}
    below = {n for n in model["nonfinite_names"] if not n.startswith("model.layers.1.")}
    assert set(model["nonfinite_names"]) - below == top and "model.embed_tokens.weight" in below
    assert "model.layers.0.mlp.down_proj.weight" in below and "lm_head.weight" not in model["nonfinite_names"]
