#!/usr/bin/env bash
# The GPU organism's table (issue 16) as research/organism/organism_runs.py variants of
# recipes/organism-gpu.yaml, all sharing the teacher of run kd0. Prints RUNS_ARGS for bg.sh:
#   RUNS_ARGS="$(bash research/organism/organism_table_runs.sh [VARIANT...])" bash research/organism/bg.sh start runs
# Variants kd0 ... ce1 make the W3G128 / W2G128 columns, akd0 ... ace1 (prefix a) the W4A4KV4 column;
# the digit is the seed. Naming some runs only these (a later call on a fresh machine leaves out the
# runs that already came back); naming none runs all twenty. Each row is one override of the recipe, so
# no row is tuned beyond what the recipe shows; seed 1 changes the calibration sample, the QAT/RL data
# order and the eval's sampling, not the teacher (model.demo.seed).
# The runs are named after the teacher's training steps (t350-kd0 ...: bg.sh's UNPACK then names
# runs/organism-gpu-t350-kd0) and the table goes to research/organism/table-t350;
# TEACHER_STEPS=N builds the same table on a teacher trained for N steps instead of the recipe's.
# Issue 31/29 rows (the same teacher recipe; TAG=t350b- names a table of its own, SOURCE=own0 its teacher):
#   own0/1  BF16, GPTQ and KD-QAT on the teacher's own traces (the reference rows of that teacher)
#   kdf0/1, cef0/1  KD-QAT / CE-QAT on the other generator's traces (qat.data.demo_trace: compact)
#   kds0/1  KD-QAT on the teacher's own sampled responses (qat.data.responses: teacher), self-distillation
#   kdc0/1  KD-QAT from the cached top-64 teacher (qat.kd.teacher: cached)
#   e20s0/1, eNs0/1    W2G128: GRPO for 20 / N steps from a KD-QAT student stopped early (30 of 300 steps)
#   fNs0/1             W2G128: GRPO for N steps from the finished KD-QAT student
#   eNlrXs0/1          eNs0/1 at rl.latent_lr X instead of the recipe's (e.g. e60lr3e-2s0: 60 steps at 3e-2)
#   rtn0/1             BF16 and plain RTN (no rotation: with prefix a, W4A4KV4 RTN as the recipe runs it untouched,
#                      and without BF16, which the W3/W2 runs evaluate)
#   f32rtn0/1          with prefix a: Hadamard + RTN evaluated in float32 (eval.dtype) instead of the GPU's bfloat16
#   rlptqe0/1          rlptq0/1 with eager attention (model.attn_implementation=eager): the NaN-gradient
#                      GRPO step's candidate cause is the SDPA kernels' backward (rl-nan-cpu/README.md)
# Issue 31 item 4, the training-dynamics rows (each trains its own teacher of the recipe's length; the digit
# is the teacher's seed, model.demo.seed, which also draws its problems): W3G128 RTN and GPTQ after
#   dcos0/1  the recipe's cosine schedule     dwsd0/1  warmup-stable-decay (last 20% decays)
#   dlawa0/1 WSD + LAWA (the last 5 snapshots, 20 steps apart, averaged into the saved teacher)
#   dcosNs0/1 the cosine schedule trained for N steps instead (e.g. dcos400s0: to meet WSD's validation loss)
set -eu
S1="seed=1 calibration.seed=1 eval.seed=1"
PTQ="qat.enabled=false rl.enabled=false eval.methods=[bf16,rtn,gptq_generic,gptq]"  # the PTQ rows
KD="ptq.baselines=[] eval.methods=[qat,qat_rl]"                                      # KD-QAT from GPTQ, then GRPO
R="qat.init=rtn ptq.baselines=[rtn] rl.enabled=false eval.methods=[qat]"             # KD-QAT from RTN
C="qat.kd.loss=ce ptq.baselines=[] rl.enabled=false eval.methods=[qat]"              # CE-QAT from GPTQ
# GRPO straight from RTN, past the cold-start gate (rl.min_accuracy 0) for this row only
P="qat.enabled=false rl.init=ptq ptq.method=rtn ptq.baselines=[] rl.min_accuracy=0.0 eval.methods=[ptq_rl]"
A4="quant.bits=[4] quant.preset=w4a4kv4 ptq.rotation=hadamard"
w23="kd0 kd1 rlptq0 rlptq1 ptq0 ptq1 kdrtn0 kdrtn1 ce0 ce1"  # the order runs start in: longest first
OWN="ptq.baselines=[] rl.enabled=false eval.methods=[bf16,gptq,qat]"                 # the reference rows
F="qat.data.demo_trace=compact ptq.baselines=[] rl.enabled=false eval.methods=[qat]"  # another generator's traces (GPTQ: own0's)
SELF="qat.data.responses=teacher qat.data.max_samples=19200 qat.data.generation.batch_size=1200 \
qat.data.generation.max_new_tokens=640 qat.data.generation.backend=transformers ptq.baselines=[] rl.enabled=false eval.methods=[qat]"
# the cache covers the QAT set: its first 19,200 rows, the examples 300 steps x 64 read (as SELF's)
CACHED="qat.kd.teacher=cached qat.data.max_samples=19200 ptq.baselines=[] rl.enabled=false eval.methods=[qat]"
RLW2="quant.bits=[2] ptq.baselines=[] eval.methods=[qat,qat_rl] rl.save_steps=20"
DYN="qat.enabled=false rl.enabled=false quant.bits=[3] ptq.baselines=[rtn] eval.methods=[bf16,rtn,gptq]"
w4a4kv4="akd0 akd1 arlptq0 arlptq1 aptq0 aptq1 akdrtn0 akdrtn1 ace0 ace1"
want=${*:-$w23 $w4a4kv4}
steps=${TEACHER_STEPS:-$(awk '$1 == "train_steps:" {print $2; exit}' recipes/organism-gpu.yaml)}
[ -n "$steps" ] || { echo "recipes/organism-gpu.yaml has no model.demo.train_steps: set TEACHER_STEPS" >&2; exit 2; }
tag=${TAG:-t$steps-}; teacher="model.demo.train_steps=$steps"; out=research/organism/table-${tag%-}
args="--base recipes/organism-gpu.yaml --out $out --parallel ${PARALLEL:-8}"
# SOURCE's teacher (kd0 unless named) is everyone's: with SOURCE in the list the others wait for it (trained
# there, or put there by bg.sh's UNPACK before the runs start); without, it must already be on disk
src=${SOURCE:-kd0}
shared=$(for v in $want; do [[ $v == d* ]] || echo "$v"; done)  # the dynamics rows train their own teachers
[ -z "$shared" ] || [[ " $want " == *" $src "* ]] || args="$args --teacher-from runs/organism-gpu-${tag}$src"
for v in $want; do
  scheme=""; base=$v; own=""
  # W4A4KV4: Hadamard-rotated (as QuaRot runs it) for every method of the column; BF16 is the w23 runs'
  [ "${v:0:1}" = a ] && { scheme=$A4; base=${v:1}; }
  case $base in
    kdrtn[01]) rows=$R ;; kd[01]) rows=$KD ;; rlptq[01]) rows=$P ;; ce[01]) rows=$C ;;
    rlptqe[01]) rows="$P model.attn_implementation=eager" ;;
    rtn[01]) rows="qat.enabled=false rl.enabled=false ptq.method=rtn ptq.rotation=none ptq.baselines=[] eval.methods=[bf16,rtn]"
      [ -n "$scheme" ] && rows=${rows/bf16,/} ;;
    f32rtn[01]) rows="qat.enabled=false rl.enabled=false ptq.method=rtn ptq.baselines=[] eval.methods=[rtn] eval.dtype=float32" ;;
    ptq[01]) rows=$PTQ; [ -n "$scheme" ] && rows=${rows/bf16,/} ;;
    own[01]) rows=$OWN ;; kdf[01]) rows=$F ;; cef[01]) rows="$F qat.kd.loss=ce" ;; kds[01]) rows=$SELF ;;
    kdc[01]) rows=$CACHED ;;
    dcos[01]) own=1; rows="$DYN model.demo.seed=${v: -1}" ;;
    dcos[0-9]*s[01]) n=${base#dcos}; own=1; rows="$DYN model.demo.train_steps=${n%s?} model.demo.seed=${v: -1}" ;;
    dwsd[01]) own=1; rows="$DYN model.demo.schedule=wsd model.demo.seed=${v: -1}" ;;
    dlawa[01]) own=1; rows="$DYN model.demo.schedule=wsd model.demo.averaging=lawa model.demo.lawa_interval=20 model.demo.seed=${v: -1}" ;;
    # the KD-QAT start is evaluated once: by e20s (stopped early) and own (finished, the same recipe)
    e20s[01]) rows="$RLW2 qat.max_steps=30 rl.max_steps=20" ;;
    e[0-9]*lr*s[01]) n=${base#e}; lr=${n#*lr}; rows="$RLW2 qat.max_steps=30 rl.max_steps=${n%%lr*} rl.latent_lr=${lr%s?} eval.methods=[qat_rl]" ;;
    e[0-9]*s[01]) n=${base#e}; rows="$RLW2 qat.max_steps=30 rl.max_steps=${n%s?} eval.methods=[qat_rl]" ;;
    f[0-9]*s[01]) n=${base#f}; rows="$RLW2 rl.max_steps=${n%s?} eval.methods=[qat_rl]" ;;
    *) echo "unknown variant $v (one of: $w23 $w4a4kv4 own kdf cef kds kdc rlptqe rtn f32rtn (then 0 or 1), e20s eNs eNlrXs fNs dcos dwsd dlawa dcosNs (then 0 or 1))" >&2; exit 2 ;;
  esac
  seed=""; [ "${v: -1}" = 1 ] && [ -z "$own" ] && seed=$S1
  args="$args --variant $tag$v $teacher $scheme $rows $seed"
  [ -z "$own" ] && [[ " $want " == *" $src "* ]] && [ "$v" != "$src" ] && args="$args --share $tag$v ${tag}$src"
done
echo "$args"
