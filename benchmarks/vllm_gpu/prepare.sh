#!/usr/bin/env bash
# Prepare, where pip works, what a GPU machine without network access needs to run vLLM 0.26 (install.sh there).
# vLLM 0.26.0 is built for torch 2.11 + CUDA 13.0; its wheel is 304 MB and the GPU image lacks ~20 of its
# dependencies, so the wheel is trimmed and split in two parts of under 64 MiB.
#   bash benchmarks/vllm_gpu/prepare.sh      # from the checkout root; first run ~7-10 min (xz -9 of 326 MB)
# Output (all git-ignored):
#   .vl/p1/payload.part00        vLLM trimmed, tar.xz, first half               -> install.sh 1
#   .vl/p2/payload.part01        second half + sha256, vLLM's missing wheels    -> install.sh 2
#   .whl/*.whl                   the project's dependencies the image lacks     -> install.sh 1
set -euo pipefail
W=${W:-/tmp/vl}          # work dir for the wheel and the trimmed tree (kept: a second run only re-splits)
PIPDL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 --platform any"
ROOT=$PWD
mkdir -p "$W"
wheels() {  # the project's dependencies the image lacks; compressed-tensors 0.17.0 is the one vLLM 0.26 pins
  rm -rf .whl && mkdir -p .whl
  $PIPDL -d .whl trl==1.16.0 datasets==5.2.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
    antlr4-python3-runtime==4.13.2 multiprocess==0.70.19 dill==0.4.1 pydantic==2.14.3 pydantic_core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 compressed-tensors==0.17.0 loguru==0.7.3
  # DeepSpeed ships as source only; research/organism/gpu_suite.sh builds it without ops (DS_BUILD_OPS=0) on the GPU.
  if [ -n "${DEEPSPEED:-}" ]; then  # and its run-time dependencies the image lacks
    python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "deepspeed==$DEEPSPEED"
    $PIPDL -d .whl hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 einops==0.8.2 nvidia-ml-py==13.615.71
  fi
  du -sh .whl
}
# WHEELS_ONLY=1: only .whl (no vLLM), e.g. for the multi-GPU qat runs (DEEPSPEED=0.18.2 adds DeepSpeed's source).
if [ -n "${WHEELS_ONLY:-}" ]; then wheels; exit 0; fi
ls "$W"/vllm-0.26.0-*.whl >/dev/null 2>&1 || $PIPDL -d "$W" vllm==0.26.0
# Trimmed: FA2 (Hopper runs FA3), the Rust serving frontend (offline LLM never runs it), the MoE ops (imported under
# suppress(ImportError); dense Qwen3 never calls them), DeepGEMM's builds for other Pythons. 304 MB -> 72.5 MB.
if [ ! -f "$W/payload.tar.xz" ]; then
  rm -rf "$W/tree" && mkdir -p "$W/tree" && cd "$W/tree"
  unzip -q "$W"/vllm-0.26.0-*.whl -x 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/vllm-rs' \
    'vllm/_moe_C_stable_libtorch.abi3.so' 'vllm/third_party/deep_gemm/_C.cpython-310-*' \
    'vllm/third_party/deep_gemm/_C.cpython-311-*' 'vllm/third_party/deep_gemm/_C.cpython-313-*' \
    'vllm/third_party/deep_gemm/_C.cpython-314-*'
  tar -cf - vllm vllm-0.26.0.dist-info | xz -9 -T0 > "$W/payload.tar.xz.tmp" && mv "$W/payload.tar.xz.tmp" "$W/payload.tar.xz"
  cd "$ROOT"
fi
rm -rf .vl && mkdir -p .vl/p1 .vl/p2/wheels
(cd "$W" && rm -f payload.part0* && split -n 2 -d payload.tar.xz payload.part && sha256sum payload.tar.xz > payload.sha256)
cp "$W/payload.part00" .vl/p1/ && cp "$W/payload.part01" "$W/payload.sha256" .vl/p2/
# vLLM's import-time dependencies missing from the image (found by importing its engine, worker, Qwen3,
# compressed-tensors, GPTQ, FlashAttention and sampler modules in a venv holding only the image's packages), plus
# humming-kernels (vLLM 0.26's only WNA16 kernel for 2/3 bits) and depyf/setproctitle (imported at run time).
$PIPDL -d .vl/p2/wheels msgspec==0.23.0 pyzmq==27.3.0 pybase64==1.5.1 cbor2==6.3.0 cachetools==8.0.2 \
  openai-harmony==0.0.8 openai==2.54.0 sniffio==1.3.1 distro==1.9.0 jiter==0.19.0 llguidance==1.7.6 \
  xgrammar==0.2.7 apache-tvm-ffi==0.1.10 fastapi==0.136.3 starlette==1.10.0 partial-json-parser==0.2.1.1.post7 \
  depyf==0.20.0 astor==0.8.1 setproctitle==1.3.8 pyelftools==0.33 humming-kernels==0.1.10
wheels
du -sh .vl/p1 .vl/p2
