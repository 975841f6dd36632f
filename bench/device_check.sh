#!/usr/bin/env bash
# Every GPU figure in one call of the device tool (one H200, 10 minutes a call): the CUDA tests, the offload
# device check, the step bench on OLMoE-1B-7B's published shape and the offload bench on Mixtral-8x7B's, both
# under a 24 GB cap; each part under its own timeout, clipped to what is left of the call; one JSON at the end.
#
#   bench/device_check.sh              # on the device: results in $OUT/device_check.json (+ $OUT/parts/*)
#   bench/device_check.sh --dry-run    # anywhere: the plan (commands, limits), and the scripts compile
#
# Wheels the device image lacks (bitsandbytes, pytest) are installed from .whl/ when it is there
# (bench/README.md, "device_check.sh", says how to fill it). BUDGET_S (default 560) is the seconds all parts
# may use together, leaving the rest of the 600 s call for the JSON and the transfer back; PARTS (names, space
# separated) runs a subset, e.g. to rerun one that failed.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/device-out}
BUDGET=${BUDGET_S:-560}
PARTS=${PARTS:-setup cuda-tests check-offload step-olmoe offload-mixtral}  # a subset reruns only those
START=$(date +%s)
mkdir -p "$OUT/parts"
[ "$DRY" = 1 ] || rm -f "$OUT/parts/order.txt"

part() {  # part NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, what is left), note rc and seconds
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  [ "$DRY" = 1 ] || echo "$name" >> "$OUT/parts/order.txt"
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$DRY" = 1 ]; then
    printf '[%s] up to %ss: %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if [ "$left" -lt 30 ]; then
    printf '{"rc": null, "seconds": 0, "limit_s": 0, "skipped": "only %ss of the budget left"}\n' "$left" \
      > "$OUT/parts/$name.meta.json"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" > "$OUT/parts/$name.txt" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '{"rc": %s, "seconds": %s, "limit_s": %s, "timed_out": %s}\n' "$rc" \
    "$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" "$limit" "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" \
    > "$OUT/parts/$name.meta.json"
  echo "[$name] rc $rc in $(awk "BEGIN{printf \"%.0f\", $t1 - $t0}") s (limit $limit s)"
}

# wheels into /tmp/site (on PYTHONPATH), then what the machine is (a string: `timeout` runs it through bash)
SETUP='if ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi -L
"$PY" -c "import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, \
peft.__version__, b.__version__, torch.cuda.is_available())"'
export PY

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 1 ]; then
  echo "device_check: budget ${BUDGET}s, results under $OUT"
  $PY -m py_compile bench/bench_step.py bench/bench_offload.py bench/check_offload_device.py tests/test_cuda.py \
    && echo "scripts compile"
  if ls .whl/*.whl > /dev/null 2>&1; then echo "wheels: $(ls .whl | tr '\n' ' ')"; else echo "wheels: none in .whl/"; fi
fi
part setup 60 bash -c "$SETUP"
part cuda-tests 90 $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
part check-offload 60 $PY bench/check_offload_device.py
part step-olmoe 180 $PY bench/bench_step.py --published --model olmoe --gpu-gb 24 --micro-batch 4 --seq-len 256 \
  --grad-accum 2 --repeats 3 --variants moetune,baseline --out "$OUT/parts/step-olmoe.json"
part offload-mixtral 170 $PY bench/bench_offload.py --model mixtral --gpu-gb 24 --steps 3 \
  --variants moetune-layer-major,moetune-layer-major-per-expert --json "$OUT/parts/offload-mixtral.json"
[ "$DRY" = 1 ] && exit 0

$PY - "$OUT" <<'EOF'
import datetime, json, sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {}
for name in (out / "parts" / "order.txt").read_text().split():
    entry = json.loads((out / "parts" / f"{name}.meta.json").read_text())
    text = out / "parts" / f"{name}.txt"
    if text.is_file():
        entry["tail"] = text.read_text(errors="replace").splitlines()[-40:]
    result = out / "parts" / f"{name}.json"
    if result.is_file():
        try:
            entry["result"] = json.loads(result.read_text())
        except json.JSONDecodeError as e:
            entry["result_error"] = f"{result.name}: {e}"
    parts[name] = entry
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ok": all(p.get("rc") == 0 for p in parts.values()), "parts": parts}
(out / "device_check.json").write_text(json.dumps(summary, indent=1))
print("device_check:", {k: v.get("rc") for k, v in parts.items()}, "->", out / "device_check.json")
EOF
