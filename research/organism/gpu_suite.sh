#!/usr/bin/env bash
# Runs on the lent GPU machine (see README "GPU results"): installs the carried wheels and the
# project, then runs the parts named on the command line; results land in $OUT/results.tar.gz.
#   bash research/organism/gpu_suite.sh bench        # benchmarks/*.py
#   bash research/organism/gpu_suite.sh demo         # recipes/demo-gpu.yaml end to end
#   bash research/organism/gpu_suite.sh ablations    # $ABLATIONS (recipes/*.yaml names) sharing one teacher, compared
#   parts qatstep, gen, gptq run one benchmark each (QAT_ARGS, GEN_ARGS, GPTQ_ARGS; T_* timeouts)
#   part qatstage: the real qat stage vs a naive loop (STAGE_ARGS, e.g. "--arch qwen3-1.7b")
#   part tests: pytest $TESTS (default tests/stages/test_qat_gpu.py); part multigpu: qat_multi_gpu.py $MULTI_ARGS
#   part kvgen: benchmarks/kv_quant_generation.py $KVGEN_ARGS once per dtype in $KVGEN_DTYPES, JSON in runs/_kv
#   part sdpa: research/organism/sdpa_cudnn_nan.py $SDPA_ARGS (SDPA's cuDNN NaN query gradient, pytorch#196678), JSON in runs/_sdpa
set -uo pipefail
mkdir -p "${OUT:-/tmp/out}"
echo "start $(date +%T)" | tee "${OUT:-/tmp/out}/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
if [ -z "${SKIP_DS:-}" ] && ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz \
    || echo "deepspeed install failed"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
echo "installed $(date +%T)" | tee -a "${OUT:-/tmp/out}/log.txt"
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
LOG="${OUT:-/tmp/out}/log.txt"
# Every timeout is capped by what is left of DEADLINE (seconds since start), so the results
# archive at the end is always written inside the device call's own limit.
t() { local left=$(( ${DEADLINE:-560} - SECONDS )); [ "$left" -lt 5 ] && left=5; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
quiet() { grep --line-buffered -v "it/s]\|s/it]" | tee -a "$LOG"; }
for part in "$@"; do
  echo "== $part $(date +%T)" | tee -a "$LOG"
  case $part in
    bench)  # all four benchmarks
      (cd benchmarks
       timeout $(t ${T_KD:-90}) python3 kd_loss.py
       timeout $(t ${T_QAT:-240}) python3 qat_step.py ${QAT_ARGS:-}
       timeout $(t ${T_GPTQ:-240}) python3 gptq_time.py ${GPTQ_ARGS:-}
       timeout $(t ${T_GEN:-120}) python3 generation.py ${GEN_ARGS:-}) 2>&1 | quiet ;;
    qatstage) (cd benchmarks; timeout $(t ${T_STAGE:-420}) python3 qat_stage.py ${STAGE_ARGS:-}) 2>&1 | quiet ;;
    qatstep) (cd benchmarks; timeout $(t ${T_QAT:-240}) python3 qat_step.py ${QAT_ARGS:-}) 2>&1 | quiet ;;
    tests) timeout $(t ${T_TESTS:-300}) python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/stages/test_qat_gpu.py} 2>&1 | quiet ;;
    multigpu) (cd benchmarks; timeout $(t ${T_MULTI:-540}) python3 qat_multi_gpu.py ${MULTI_ARGS:-}) 2>&1 | quiet ;;
    sdpa)  # SDPA's cuDNN NaN query gradient (pytorch#196678) and the training stages' switch, kernel and model level
      timeout $(t ${T_SDPA:-180}) python3 research/organism/sdpa_cudnn_nan.py ${SDPA_ARGS:-} --out runs/_sdpa/sdpa_cudnn_nan.json 2>&1 | quiet ;;
    kvgen)  # W4A4KV4 generation: K/V transformed at cache write vs the whole cache every step, per dtype
      for d in ${KVGEN_DTYPES:-bfloat16}; do
        timeout $(t ${T_KVGEN:-240}) python3 benchmarks/kv_quant_generation.py ${KVGEN_ARGS:-} --dtype $d \
          --out runs/_kv/kv_quant_generation-$d.json 2>&1 | quiet
      done ;;
    gen) (cd benchmarks; timeout $(t ${T_GEN:-120}) python3 generation.py ${GEN_ARGS:-}) 2>&1 | quiet ;;
    gptq) (cd benchmarks; BENCH_TAG=${GPTQ_TAG:-} timeout $(t ${T_GPTQ:-240}) python3 gptq_time.py ${GPTQ_ARGS:-}) 2>&1 | quiet ;;
    demo) timeout $(t ${T_DEMO:-500}) rqat run recipes/demo-gpu.yaml 2>&1 | quiet ;;
    organism) timeout $(t ${T_ORG:-540}) rqat run recipes/organism-gpu.yaml 2>&1 | quiet ;;
    runs)  # research/organism/organism_runs.py $RUNS_ARGS, stopped (resumable) before the call's deadline;
      # RUNS_ARGS2 (optional): a second set beside it, e.g. runs that train their own teachers and so
      # must not get the first set's --teacher-from
      dl=$(( $(t 9999) - ${RUNS_MARGIN:-45} ))
      if [ -n "${RUNS_ARGS2:-}" ]; then python3 research/organism/organism_runs.py --deadline $dl $RUNS_ARGS2 2>&1 | quiet & fi
      python3 research/organism/organism_runs.py --deadline $dl $RUNS_ARGS 2>&1 | quiet
      wait ;;
    ablations)
      # Recipes whose model section matches share one teacher: the first run trains it and the
      # others get a copy (the pipeline accepts it only if its recipe hash matches).
      first=""
      for r in ${ABLATIONS:-demo-gpu-ce demo-gpu-rtn-init demo-gpu-zero2}; do
        if [ -n "$first" ] && [ ! -d runs/$r/teacher ]; then mkdir -p runs/$r && cp -r runs/$first/teacher runs/$r/; fi
        timeout $(t ${T_ABL:-200}) rqat run recipes/$r.yaml 2>&1 | quiet
        first=${first:-$r}
      done
      runs=$(for r in ${ABLATIONS:-demo-gpu-ce demo-gpu-rtn-init demo-gpu-zero2}; do echo runs/$r; done)
      rqat compare $runs --out benchmarks/results/${ABL_OUT:-ablations} 2>&1 | tee -a "$LOG" ;;
  esac
done
# Keep manifests, metrics, compare tables and plots (not the checkpoints).
bash research/organism/pack_results.sh "${OUT:-/tmp/out}/results.tar.gz"
ls -la "${OUT:-/tmp/out}"
