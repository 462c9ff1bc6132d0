"""Mean GRPO training reward per step range, read from runs' progress logs (`runs/_logs/*.log`).

A run cut off before its end (a device call's machine gone) leaves no rl_metrics.json; its log still has one
progress line per step ("rl w2: step 12/200 (6%) | loss ... | reward 0.531 | grad norm 0.112 | ..."). Runs of
one seed see the same prompts at each step, so two logs of a seed compare step for step.

    python research/organism/organism_rewards.py LOG [LOG ...] --ranges 1-20 21-60
prints, per log: the last step reached, the steps whose gradient norm was NaN (the skipped steps), and the
mean reward over each range (over the steps of that range the log has).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from reasoning_qat.training import read_progress_line

RL = re.compile(r"rl w\d+")  # the rl stage's progress label (training.readable_progress)


def step_rewards(log: str | Path) -> dict[int, tuple[float, str]]:
    """{step: (reward, grad norm as printed)} from a progress log, the lines read by
    `training.read_progress_line`; carriage-return redraws count as lines, and a step printed twice (a
    resumed run) keeps its last line."""
    text = Path(log).read_text(errors="replace").replace("\r", "\n")
    out = {}
    for line in text.splitlines():
        read = read_progress_line(line)
        if read is not None and RL.fullmatch(read[0]) and "reward" in read[2]:
            out[read[1]] = (float(read[2]["reward"]), read[2].get("grad_norm", "-"))
    return out


def mean_reward(steps: dict[int, tuple[float, str]], lo: int, hi: int) -> tuple[float | None, int]:
    """The mean reward over the steps lo..hi (inclusive) the log has, and how many those were."""
    values = [r for k, (r, _) in steps.items() if lo <= k <= hi]
    return (sum(values) / len(values) if values else None), len(values)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--ranges", nargs="+", default=["1-20", "21-60"], help="step ranges lo-hi, inclusive")
    args = ap.parse_args(argv)
    ranges = [tuple(int(x) for x in r.split("-")) for r in args.ranges]
    for log in args.logs:
        steps = step_rewards(log)
        if not steps:
            print(f"{log}: no rl progress lines")
            continue
        nan = [k for k, (_, g) in sorted(steps.items()) if g.lower() == "nan"]
        cells = []
        for lo, hi in ranges:
            m, n = mean_reward(steps, lo, hi)
            cells.append(f"steps {lo}-{hi}: " + (f"{m:.3f} (n={n})" if m is not None else "-"))
        print(f"{Path(log).name}: last step {max(steps)}, NaN grad norm at {nan or 'none'}; mean reward "
              + "; ".join(cells))


if __name__ == "__main__":
    main()
