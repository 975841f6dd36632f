#!/usr/bin/env bash
# Every GPU figure in one call of the device tool (one H200, 10 minutes a call): the CUDA tests, the same tests and
# a bf16 offload check on the consumer GPUs' path (segment GEMMs forced), the offload device check, the step bench
# on OLMoE-1B-7B's published shape and the offload bench on Mixtral-8x7B's, both under a 24 GB cap; each part
# under its own timeout, clipped to what is left of the call; one JSON at the end.
#
#   bench/device_check.sh              # on the device: results in $OUT/device_check.json (+ $OUT/parts/*)
#   bench/device_check.sh --dry-run    # anywhere: every wheel resolves offline, the plan, the scripts compile
#
# The device image is taken as bare: the wheels of bench/device_wheels.txt (bitsandbytes, gguf, pytest and what
# pytest imports) are installed from $WHEELS (default .whl/; bench/README.md, "device_check.sh", says how to fill
# it) with no index. --dry-run resolves every one of them offline for the device's Python (3.12, manylinux
# x86_64) and checks that their dependencies are wheels there too or come with the image (IMAGE_PROVIDES); it
# exits 1 naming what is missing. BUDGET_S (default 560) is the seconds all parts may use together, leaving the
# rest of the 600 s call for the JSON and the transfer back; PARTS (names, space separated) runs a subset.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/device-out}
WHEELS=${WHEELS:-.whl}
REQS=bench/device_wheels.txt
IMAGE_PROVIDES=${IMAGE_PROVIDES:-torch numpy pyyaml requests tqdm}  # what the device image's python3 holds
BUDGET=${BUDGET_S:-560}
PARTS=${PARTS:-setup cuda-tests consumer-path check-offload step-olmoe offload-mixtral}
START=$(date +%s)
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
[ "$DRY" = 1 ] || { mkdir -p "$OUT/parts"; rm -f "$OUT/parts/order.txt"; }

part() {  # part NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, what is left), note rc and seconds
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  if [ "$DRY" = 1 ]; then
    printf '[%s] up to %ss: %s\n' "$name" "$limit" "$*"
    return 0
  fi
  echo "$name" >> "$OUT/parts/order.txt"
  local left=$(( BUDGET - ($(date +%s) - START) ))
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

check_wheels() {  # every wheel of $REQS in $WHEELS for the device's Python, and every dependency of them covered
  local tmp rc
  tmp=$(mktemp -d)
  "$PY" -m pip install --dry-run --quiet --no-index --find-links "$WHEELS" --no-deps --ignore-installed \
    --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS --target "$tmp" -r "$REQS"
  rc=$?
  rm -rf "$tmp"
  if [ $rc != 0 ]; then
    echo "wheels: pip cannot install $REQS from $WHEELS/ offline (above: the missing one); fill $WHEELS/ with the"
    echo "        recipe in bench/README.md (\"device_check.sh\")"
    return 1
  fi
  "$PY" - "$WHEELS" "$REQS" $IMAGE_PROVIDES <<'PYEOF'
import re, sys, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement

folder, reqs, image = Path(sys.argv[1]), Path(sys.argv[2]), {n.lower().replace("_", "-") for n in sys.argv[3:]}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wanted = {norm(Requirement(l).name) for l in reqs.read_text().splitlines() if l.strip() and not l.startswith("#")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "extra": ""}
have, missing = {}, []
for whl in sorted(folder.glob("*.whl")):
    have[norm(whl.name.split("-")[0])] = whl
for name in sorted(wanted):
    with zipfile.ZipFile(have[name]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, another Python or platform
            dep = norm(req.name)
            if dep not in wanted and dep not in image:
                missing.append(f"{dep} (needed by {name})")
if missing:
    print("wheels: missing on the device image and not in bench/device_wheels.txt:", ", ".join(missing))
    sys.exit(1)
print(f"wheels: all {len(wanted)} of {reqs} resolve offline from {folder}/ for Python 3.12 / manylinux x86_64; "
      f"their dependencies are there or in the image ({', '.join(sorted(image))})")
PYEOF
}

# wheels into /tmp/site (on PYTHONPATH), then what the machine is (a string: `timeout` runs it through bash)
SETUP='"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$WHEELS" \
  --target /tmp/site -r "$REQS" || exit 1
nvidia-smi -L
"$PY" -c "import torch, transformers, peft, bitsandbytes as b, gguf, pytest; print(torch.__version__, \
transformers.__version__, peft.__version__, b.__version__, pytest.__version__, torch.cuda.is_available(), \
torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"'
# the consumer GPUs' path on this GPU: segment matmuls instead of _grouped_mm (sm_86/89/120 take them), bf16 offload
CONSUMER='MOETUNE_GROUPED_MM=segment "$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider || exit 1
MOETUNE_GROUPED_MM=segment "$PY" bench/check_offload_device.py --dtype bf16'
export PY WHEELS REQS

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 1 ]; then
  echo "device_check: budget ${BUDGET}s, results under $OUT"
  check_wheels || exit 1
  $PY -m py_compile bench/bench_step.py bench/bench_offload.py bench/check_offload_device.py tests/test_cuda.py \
    || exit 1
  echo "scripts compile"
fi
part setup 60 bash -c "$SETUP"
part cuda-tests 75 $PY -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
part consumer-path 90 bash -c "$CONSUMER"
part check-offload 45 $PY bench/check_offload_device.py
part step-olmoe 150 $PY bench/bench_step.py --published --model olmoe --gpu-gb 24 --micro-batch 4 --seq-len 256 \
  --grad-accum 2 --repeats 3 --variants moetune,baseline --out "$OUT/parts/step-olmoe.json"
part offload-mixtral 140 $PY bench/bench_offload.py --model mixtral --gpu-gb 24 --steps 3 \
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
