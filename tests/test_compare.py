"""compare.py: one table across runs from what the stages recorded (read through RunLayout), labels by how
each variant was made, recovery and CE increase against BF16, the report files, and its refusals."""

import json

import pytest

from reasoning_qat.compare import collect, to_markdown, write_report
from reasoning_qat.errors import UserError
from reasoning_qat.run_layout import RunLayout, Variant


def _stage(run, name, metrics):
    d = run / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"status": "done", "metrics": metrics}))


def _run(tmp_path, name, qat_loss="forward_kl", domain="reasoning"):
    run = tmp_path / name
    _stage(run, "calibrate", {"domain": domain})
    _stage(run, "ptq", {"w2-gptq": {"rotation": "none"}, "w2-rtn": {"rotation": "none"}})
    _stage(run, "qat", {"w2-qat": {"loss": qat_loss, "init": "rtn"}})
    _stage(run, "export", {"w2-qat": {"compressed-tensors_bytes": 3 * 2**20, "dequantized_bytes": 9 * 2**20}})
    _stage(run, "eval", {"bf16": {"demo_arith": {"pass@1": 0.80, "ci95": 0.02, "ce": 0.010}},
                         "w2-rtn": {"demo_arith": {"pass@1": 0.40, "ci95": 0.03, "ce": 0.030}},
                         "w2-gptq": {"demo_arith": {"pass@1": 0.60, "ci95": 0.03, "ce": 0.015}},
                         "w2-qat": {"demo_arith": {"pass@1": 0.76, "ci95": 0.02, "ce": 0.011}}})
    return run


def test_rows_label_order_and_ratios(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", qat_loss="ce", domain="generic")
    rows = collect([a, b])
    assert [(r["run"], r["method"]) for r in rows[:4]] == [("a", "bf16"), ("a", "rtn"), ("a", "gptq"), ("a", "qat")]
    by = {(r["run"], r["method"]): r for r in rows}
    assert by[("a", "qat")]["label"] == "KD-QAT (RTN init)" and by[("b", "qat")]["label"] == "CE-QAT (RTN init)"
    assert by[("a", "gptq")]["label"] == "GPTQ (domain calib)" and by[("b", "gptq")]["label"] == "GPTQ (generic calib)"
    assert by[("a", "qat")]["recovery"] == pytest.approx(0.76 / 0.80)
    assert by[("a", "rtn")]["ce_increase"] == pytest.approx(2.0)
    assert by[("a", "qat")]["size_bytes"] == 3 * 2**20  # the packed export users serve, not the dequantized one
    md = to_markdown(rows)
    assert "| a | demo_arith | 2 | KD-QAT (RTN init) | 0.760 | 0.020 | 95.0 | 3.00 | 0.0110 | +10.00 |" in md


def test_labels_name_where_the_qat_targets_came_from(tmp_path):
    """QAT on another generator's traces, on the teacher's own responses or from a cached top-k teacher
    is a row of its own (the organism's table pools runs by label), also after RL."""
    origins = {"own": {}, "trace": {"trace": "compact", "responses": "dataset", "teacher": "online"},
               "self": {"responses": "teacher", "teacher": "online"}, "cached": {"teacher": "cached", "cache_top_k": 64},
               "both": {"loss": "ce", "init": "rtn", "trace": "compact"}}
    runs = []
    for name, origin in origins.items():
        run = _run(tmp_path, name)
        _stage(run, "qat", {"w2-qat": {"loss": "forward_kl", "init": "ptq", **origin}})
        # the domain calibration is cut from the same QAT set: its GPTQ is another row too
        data = {k: v for k, v in origin.items() if k in ("responses", "trace")}
        _stage(run, "calibrate", {"domain": "reasoning", **data})
        (run / "eval" / "manifest.json").write_text(json.dumps({"status": "done", "metrics": {
            "w2-qat": {"demo_arith": {"pass@1": 0.7, "ci95": 0.02}}, "w2-qat_rl": {"demo_arith": {"pass@1": 0.7, "ci95": 0.02}},
            "w2-gptq": {"demo_arith": {"pass@1": 0.6, "ci95": 0.02}}}}))
        runs.append(run)
    labels = {(r["run"], r["method"]): r["label"] for r in collect(runs)}
    assert labels[("own", "qat")] == "KD-QAT" and labels[("own", "qat_rl")] == "KD-QAT + RL"
    assert labels[("trace", "qat")] == "KD-QAT (compact traces)"
    assert labels[("self", "qat_rl")] == "KD-QAT (teacher's responses) + RL"
    assert labels[("cached", "qat")] == "KD-QAT (cached top-64)"
    assert labels[("both", "qat")] == "CE-QAT (RTN init, compact traces)"
    assert labels[("own", "gptq")] == labels[("cached", "gptq")] == "GPTQ (domain calib)"
    assert labels[("trace", "gptq")] == "GPTQ (domain calib, compact traces)"
    assert labels[("self", "gptq")] == "GPTQ (domain calib, teacher's responses)"


def test_report_files_and_an_unfinished_eval(tmp_path):
    run = _run(tmp_path, "a")
    rows, md = write_report([run], tmp_path / "out", make_plot=True)
    out = tmp_path / "out"
    assert (out / "compare.md").read_text() == md + "\n" and json.loads((out / "compare.json").read_text()) == rows
    assert (out / "compare.png").stat().st_size > 1000

    cut = tmp_path / "cut"
    _stage(cut, "qat", {})
    layout = RunLayout(cut, {"eval": RunLayout(cut).partial("eval")})  # what the running eval stage writes through
    done = layout.eval_metrics(Variant(2, "qat"), "demo_arith")
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"pass@1": 0.5, "ci95": 0.1}))
    layout.eval_ce(Variant(2, "qat"), "demo_arith").write_text(json.dumps({"ce": 0.02}))
    layout.eval(Variant(2, "rtn"), "demo_arith").mkdir(parents=True)  # started, no metrics yet: not a row
    with pytest.raises(UserError, match="no finished eval stage; run `rqat run RECIPE --stages eval` first"):
        collect([cut])
    (row,) = collect([cut], unfinished=True)
    assert (row["method"], row["pass@1"], row["ce"], row["unfinished_eval"]) == ("qat", 0.5, 0.02, True)


def test_the_plot_shows_the_intervals_and_keeps_series_apart(tmp_path):
    """Every method's points carry their 95% CI as error bars, methods at one bit width sit at distinct x, and
    the y-range spans the intervals instead of 0-1."""
    from matplotlib.container import ErrorbarContainer

    from reasoning_qat.compare import figure

    fig = figure(collect([_run(tmp_path, "a")]))
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # RTN, GPTQ, KD-QAT
    xs = [float(c.lines[0].get_xdata()[0]) for c in bars]
    assert len(set(xs)) == 3 and all(abs(x - 2) < 0.5 for x in xs)
    spans = sorted(round(float(seg[1][1] - seg[0][1]), 6) for c in bars for seg in c.lines[2][0].get_segments())
    assert spans == [0.04, 0.06, 0.06]  # 2 x ci95 of each point
    low, high = ax.get_ylim()
    assert 0.3 < low < 0.37 and 0.82 < high < 0.9
