#!/usr/bin/env bash
# `bash research/organism/pack_results.sh ARCHIVE`: the GPU runs' manifests, metrics, compare tables, plots, logs
# and each RL run's skipped non-finite steps, written as they happen (not checkpoints, not the large
# samples), into one archive that a device call brings back.
find benchmarks/results runs -name '*.json' -o -name '*.yaml' -o -name '*.md' -o -name '*.png' -o -name '*.log' -o -name nonfinite_steps.jsonl 2>/dev/null \
  | grep -v "/trainer/\|/model/\|/dequantized/\|/gptq/\|samples.jsonl" | tar czf "$1" -T -
