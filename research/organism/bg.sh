#!/usr/bin/env bash
# Device-call helper: `bash research/organism/bg.sh start PARTS...` starts research/organism/gpu_suite.sh in the
# background (its own session, so a call's time limit cannot kill it half-way through writing; DEADLINE
# is the suite's whole budget: keep it inside the call), then waits up to WAIT seconds (default 560)
# for it; `bash research/organism/bg.sh wait` only waits. If the suite of an earlier call still runs (the
# machine stayed warm), `start` waits on it instead of starting a second one.
# Every call brings back what there is so far, finished or not: logs, a results archive (manifests,
# metrics, compare tables), per-problem correctness, and the teachers named by PACK.
# A machine can be gone by the next call (30 s idle, 30 min held), so a call must not depend on the
# last one's machine: PACK=RUN_DIR packs RUN_DIR/teacher into $OUT (15 MB parts, the most a file may
# be) as soon as it is trained; copy the parts into .carry/ here and name .carry in the next call's
# carry: UNPACK=RUN_DIR puts it back there before the suite, where that run has no teacher yet. On a
# warm machine the runs resume from their last checkpoint; on a fresh one from the teacher.
BG=/tmp/bg
if [ -d .carry ] && ls .carry/teacher.tgz.part-* >/dev/null 2>&1 && [ -n "${UNPACK:-}" ] && [ ! -d "$UNPACK/teacher" ]; then
  mkdir -p "$UNPACK" && cat .carry/teacher.tgz.part-* | tar xzf - -C "$UNPACK" && echo "unpacked teacher into $UNPACK"
fi
running() { pgrep -f "research/organism/gpu_suite.sh" >/dev/null; }
if [ "$1" = start ]; then
  shift
  if running; then
    echo "the suite of an earlier call is still running: waiting on it"
  else
    mkdir -p $BG; rm -f $BG/results.tar.gz
    OUT=$BG setsid nohup bash research/organism/gpu_suite.sh "$@" > $BG/suite.log 2>&1 < /dev/null &
    sleep 1
  fi
fi
end=$(( SECONDS + ${WAIT:-560} ))
while [ $SECONDS -lt $end ] && running; do sleep 5; done
for f in runs/_logs/*.log; do [ -f "$f" ] && echo "== $f: $(tail -c 300 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"; done
tail -40 $BG/suite.log
cp $BG/suite.log "$OUT"/ 2>/dev/null
# the suite's own archive once it finished, else a snapshot of what is there now
if [ -f $BG/results.tar.gz ]; then cp $BG/results.tar.gz "$OUT"/; else bash research/organism/pack_results.sh "$OUT"/results.tar.gz; fi
# per-problem correctness of every evaluated variant (samples.jsonl stays behind: responses are large)
python3 - "$OUT"/correctness.json <<'PY' 2>/dev/null
import json, sys, pathlib
out = {}
for f in [*pathlib.Path("runs").glob("*/eval/*/*/samples.jsonl"), *pathlib.Path("runs").glob("*/.eval.partial/*/*/samples.jsonl")]:
    rows = [json.loads(l) for l in f.open()]
    out["/".join(f.parts[1:2] + f.parts[3:5])] = [[r["id"], r["sample"], int(r["correct"])] for r in rows]
json.dump(out, open(sys.argv[1], "w"))
PY
tar czf "$OUT"/logs.tar.gz runs/_logs 2>/dev/null
if [ -n "${PACK:-}" ] && [ -f "$PACK/teacher/manifest.json" ]; then
  tar czf - -C "$PACK" --exclude=teacher/trainer teacher | split -b 15M - "$OUT"/teacher.tgz.part- && echo "packed $PACK/teacher"
fi
running && echo RUNNING || echo FINISHED
