#!/usr/bin/env bash
# Runs on the lent GPU machine (see README "GPU results"): installs the carried wheels and the
# project, then runs the parts named on the command line; results land in $OUT/results.tar.gz.
#   bash benchmarks/gpu_suite.sh bench        # benchmarks/*.py
#   bash benchmarks/gpu_suite.sh demo         # recipes/demo-gpu.yaml end to end
#   bash benchmarks/gpu_suite.sh ablations    # demo-gpu-ce, demo-gpu-rtn-init, demo-gpu-zero2
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    || echo "deepspeed install failed"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p "${OUT:-/tmp/out}"
for part in "$@"; do
  case $part in
    bench)
      (cd benchmarks; python3 kd_loss.py; python3 qat_step.py; python3 gptq_time.py; python3 generation.py) 2>&1 | grep -v "it/s]" ;;
    demo)
      rqat run recipes/demo-gpu.yaml 2>&1 | grep -v "it/s]\|s/it]" ;;
    ablations)
      for r in demo-gpu-ce demo-gpu-rtn-init demo-gpu-zero2; do rqat run recipes/$r.yaml 2>&1 | grep -v "it/s]\|s/it]"; done ;;
  esac
done
# Keep manifests, metrics, compare tables and plots (not the checkpoints).
find benchmarks/results runs -name '*.json' -o -name '*.md' -o -name '*.png' 2>/dev/null | grep -v "/trainer/\|/model/\|/dequantized/\|/gptq/\|samples.jsonl" \
  | tar czf "${OUT:-/tmp/out}/results.tar.gz" -T -
ls -la "${OUT:-/tmp/out}"
