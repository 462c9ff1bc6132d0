#!/usr/bin/env bash
# Device-call helper: `bash benchmarks/bg.sh start PARTS...` starts benchmarks/gpu_suite.sh in the
# background (its own session, so it outlives the call; DEADLINE is the suite's whole budget), then
# waits like `wait`; `bash benchmarks/bg.sh wait` waits up to WAIT seconds (default 560) for it to
# finish. Either way it copies the logs and, once finished, the results archive into $OUT.
# A machine can be gone by the next call, so a teacher that later calls share travels with them:
# PACK=RUN_DIR packs RUN_DIR/teacher into $OUT (15 MB parts, the most a file may be); copy the parts
# into .carry/ here and name .carry in the next call's carry: it is unpacked there before the suite.
BG=/tmp/bg
if [ -d .carry ] && ls .carry/teacher.tgz.part-* >/dev/null 2>&1 && [ -n "${UNPACK:-}" ] && [ ! -d "$UNPACK/teacher" ]; then
  mkdir -p "$UNPACK" && cat .carry/teacher.tgz.part-* | tar xzf - -C "$UNPACK" && echo "unpacked teacher into $UNPACK"
fi
if [ "$1" = start ]; then
  shift; mkdir -p $BG; rm -f $BG/results.tar.gz
  OUT=$BG setsid nohup bash benchmarks/gpu_suite.sh "$@" > $BG/suite.log 2>&1 < /dev/null &
fi
end=$(( SECONDS + ${WAIT:-560} ))
while [ $SECONDS -lt $end ] && [ ! -f $BG/results.tar.gz ]; do sleep 5; done
for f in runs/_logs/*.log; do [ -f "$f" ] && echo "== $f: $(tail -c 300 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"; done
tail -40 $BG/suite.log
cp $BG/results.tar.gz $BG/suite.log "$OUT"/ 2>/dev/null
# per-problem correctness of every evaluated variant (samples.jsonl stays behind: responses are large)
python3 - "$OUT"/correctness.json <<'PY' 2>/dev/null
import json, sys, pathlib
out = {}
for f in pathlib.Path("runs").glob("*/eval/*/*/samples.jsonl"):
    rows = [json.loads(l) for l in f.open()]
    out["/".join(f.parts[1:2] + f.parts[3:5])] = [[r["id"], r["sample"], int(r["correct"])] for r in rows]
json.dump(out, open(sys.argv[1], "w"))
PY
tar czf "$OUT"/logs.tar.gz runs/_logs 2>/dev/null
if [ -f $BG/results.tar.gz ] && [ -n "${PACK:-}" ] && [ -d "$PACK/teacher" ]; then
  tar czf - -C "$PACK" teacher | split -b 15M - "$OUT"/teacher.tgz.part- && echo "packed $PACK/teacher"
fi
[ -f $BG/results.tar.gz ] && echo FINISHED || echo RUNNING
