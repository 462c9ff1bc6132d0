"""The demo's table over teacher seeds: each row's pass@1 per seed, their mean and range (issue 30 item 6).

Every fresh `rqat run recipes/demo.yaml` trains its own teacher; which problems the tiny teacher and its
2-bit variants solve moves with the seed (and, on another CPU, with the float order of its kernels). Run
the demo at several seeds (nothing else running), then:

    for s in 0 1 2; do rqat run recipes/demo.yaml seed=$s name=demo-seed$s --run-root /tmp/seeds/runs; done
    python research/organism/demo_seeds.py /tmp/seeds/runs/demo-seed{0,1,2} --out eval/results/demo-seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reasoning_qat.compare import collect, to_markdown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished demo runs, one per seed")
    ap.add_argument("--out", help="directory for the table and each run's compare table")
    a = ap.parse_args()
    per_run = {Path(r).name: {(row["bits"], row["label"]): row["pass@1"] for row in collect([r])} for r in a.runs}
    keys = list(next(iter(per_run.values())))
    names = list(per_run)
    lines = ["| bits | method | " + " | ".join(names) + " | mean | range |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for bits, label in keys:
        values = [per_run[n].get((bits, label)) for n in names]
        have = [v for v in values if v is not None]
        lines.append(f"| {bits if label != 'BF16' else 16} | {label} | " + " | ".join(f"{v:.3f}" if v is not None else "-"
                                                                                  for v in values)
                     + f" | {statistics.mean(have):.3f} | {min(have):.3f}-{max(have):.3f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "seeds.md").write_text(table + "\n")
        for r in a.runs:
            (out / f"{Path(r).name}.md").write_text(to_markdown(collect([r])) + "\n")
            manifests = {s: json.loads((Path(r) / s / "manifest.json").read_text())["wall_time_s"]
                         for s in ("teacher", "calibrate", "ptq", "qat", "export", "eval", "compare")
                         if (Path(r) / s / "manifest.json").is_file()}
            (out / f"{Path(r).name}-stage-times.json").write_text(json.dumps(manifests, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
