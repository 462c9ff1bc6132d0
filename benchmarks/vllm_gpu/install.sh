#!/usr/bin/env bash
# Install vLLM 0.26 (prepared by benchmarks/vllm_gpu/prepare.sh where pip works) and the project on a GPU machine
# without network access, in two steps (the parts land in /tmp, kept while the machine runs), then run the command
# given after the step number:
#   1: bash benchmarks/vllm_gpu/install.sh 1 [CMD...]   needs .whl and .vl/p1   project deps + vLLM's first half
#   2: bash benchmarks/vllm_gpu/install.sh 2 [CMD...]   needs .vl/p2            vLLM assembled, imported, patched
#   0: bash benchmarks/vllm_gpu/install.sh 0 [CMD...]   nothing new; vLLM already installed
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
[ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
HERE=$(cd "$(dirname "$0")" && pwd)
part=$1; shift
t0=$(date +%s)
case $part in
  1) mkdir -p /tmp/vl && cp .vl/p1/payload.part00 /tmp/vl/ || exit 1
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
     nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv ;;
  2) cp .vl/p2/payload.part01 .vl/p2/payload.sha256 /tmp/vl/ || exit 1
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .vl/p2/wheels/*.whl || exit 1
     (cd /tmp/vl && cat payload.part00 payload.part01 > payload.tar.xz && sha256sum -c payload.sha256) || exit 1
     python3 -c "import tarfile; tarfile.open('/tmp/vl/payload.tar.xz').extractall('/tmp/site', filter='fully_trusted')" || exit 1
     rm -f /tmp/vl/payload.tar.xz
     # vLLM 0.26 imports FlashInfer unguarded while building its sampler; without the package every engine dies.
     python3 "$HERE/patch_flashinfer.py" /tmp/site || exit 1
     python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)" || exit 1 ;;
  0) ;;
  *) echo "install.sh: part must be 0, 1 or 2 (got $part)"; exit 2 ;;
esac
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
echo "install part $part: $(( $(date +%s) - t0 )) s"
[ $# -gt 0 ] && exec "$@"
