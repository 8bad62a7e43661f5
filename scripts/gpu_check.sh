#!/usr/bin/env bash
# One prepared GPU run (about 6 minutes on an H100): the cuda kernel tests at real shapes, the HF
# transformers baseline, then splitfuse's benchmarks against the hardware limits measured in the
# same run. Results go to $OUT (default ./gpu_out) as JSON:
#   kernels.json     pytest exit code and counts (+ failures) of tests/cuda
#   hf.json          scripts/gpu_bench_hf.py  (transformers generate / continuous batching)
#   splitfuse.json   scripts/gpu_bench.py     (limits, matmuls, attention, decode, mixed, offline,
#                                              and a summary of the GPU performance targets as ratios;
#                                              the quant part adds its W8A16/W4A16 decode section)
#   tp.json          tensor parallelism over 2 GPUs: TP=2 greedy tokens equal TP=1's, and the
#                    times of both (or the reason it was skipped: fewer than 2 CUDA devices)
#   check.json       each part's exit code and seconds
#   logs/*.log       the full output of each part
#
# Usage: scripts/gpu_check.sh [--part kernels|bench|hf|quant|tp|all] [--quick]
#   --part quant: batch-1 decode with int8 (W8A16) and int4 (W4A16) weights vs bf16, in its own process.
#   --part bench runs gpu_bench.py only (it still reads an hf.json left in $OUT by an earlier run).
#   --quick: fewer sizes and steps; only the real-shape kernel tests.
# Without a CUDA device it dry-runs everything tiny on the CPU (Triton interpreter).
# Per-part limits in seconds (env): T_KERNELS (50), T_HF (110), T_BENCH (80), T_QUANT (90), T_TP (120).
# Exit status: 0 when every part that ran passed, else 1 (the other parts still run).
# On the GPU machine: source .whl/setup.sh; bash scripts/gpu_check.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
export OUT
mkdir -p "$OUT/logs"

PART=all
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART=${2:-}; shift 2 || { echo "--part needs a value" >&2; exit 2; } ;;
    --part=*) PART=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PART" in kernels|bench|hf|quant|tp|all) ;; *) echo "--part must be kernels, bench, hf, quant, tp or all" >&2; exit 2 ;; esac

T_KERNELS=${T_KERNELS:-50}
T_HF=${T_HF:-110}
T_BENCH=${T_BENCH:-80}
T_QUANT=${T_QUANT:-90}
T_TP=${T_TP:-120}

echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
else
  echo "nvidia-smi: not found"
fi
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'gpu', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

# No GPU: dry run. Tiny models, kernels in the Triton interpreter (set before anything imports triton).
SIZE_ARGS=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: dry run on the CPU (--tiny, TRITON_INTERPRET=1)"
  export TRITON_INTERPRET=1
  SIZE_ARGS=(--tiny)
elif [ "$QUICK" = 1 ]; then
  SIZE_ARGS=(--quick)
fi

STATUS=0
PARTS_JSON=""
# run_part NAME LIMIT_S CMD...: run under `timeout` (TERM, then KILL 10 s later), log to
# $OUT/logs/NAME.log and to stdout, and record the exit code (124/137 = timed out).
run_part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  echo "== $name: exit $rc in ${took}s"
  [ "$rc" = 0 ] || STATUS=1
  LAST_RC=$rc
  PARTS_JSON="$PARTS_JSON${PARTS_JSON:+, }\"$name\": {\"exit_code\": $rc, \"seconds\": $took, \"limit_s\": $limit, \"timed_out\": $([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo true || echo false)}"
  echo "{$PARTS_JSON}" > "$OUT/check.json"
}

# pytest's junit XML boiled down to the figures that matter (the XML itself stays out of $OUT).
kernels_json() {
  python - "$1" "$2" "$OUT/kernels.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
xml_path, rc, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
summary = {"exit_code": rc, "timed_out": rc in (124, 137), "passed": rc == 0}
try:
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    for key in ("tests", "failures", "errors", "skipped"):
        summary[key] = int(suite.get(key, 0))
    summary["time_s"] = float(suite.get("time", 0))
    bad, skipped = [], {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                bad.append({"test": name, "kind": tag, "message": (node.get("message") or "")[:600]})
        node = case.find("skipped")
        if node is not None:
            reason = (node.get("message") or "")[:120]
            skipped[reason] = skipped.get(reason, 0) + 1
    summary["failed_tests"] = bad
    summary["skipped_reasons"] = skipped
    summary["real_shape_tests"] = sorted(
        f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
        if "real" in c.get("name", "") and c.find("skipped") is None)
except Exception as exc:  # no XML when pytest was killed by the timeout
    summary["junit"] = f"unreadable: {type(exc).__name__}: {exc}"
json.dump(summary, open(out, "w"), indent=1)
print("kernels.json:", {k: v for k, v in summary.items() if k not in ("failed_tests", "skipped_reasons", "real_shape_tests")})
EOF
}

if [ "$PART" = kernels ] || [ "$PART" = all ]; then
  XML=$(mktemp -d /tmp/gpu_check.XXXXXX)/kernels.xml
  K_ARGS=()
  [ "$QUICK" = 1 ] && K_ARGS=(-k "real")  # only the real-shape tests (they skip off the GPU)
  run_part kernels "$T_KERNELS" python -m pytest tests/cuda -q -x -rfE -p no:cacheprovider --junitxml="$XML" "${K_ARGS[@]}"
  kernels_json "$XML" "$LAST_RC"
fi

# HF first, in its own process: its model and caches (tens of GB) are gone before ours is built.
# Each script stops starting sections 20 s before its limit, so a slow run ends with JSON, not a kill.
if [ "$PART" = hf ] || [ "$PART" = all ]; then
  run_part hf "$T_HF" python scripts/gpu_bench_hf.py "${SIZE_ARGS[@]}" --budget-s $((T_HF - 20))
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  run_part bench "$T_BENCH" python scripts/gpu_bench.py --backend cuda "${SIZE_ARGS[@]}" --budget-s $((T_BENCH - 20))
fi

# Quantized decode last, in its own process: three 8B engines one after another, none beside the
# bench's engine; its section is merged into splitfuse.json.
if [ "$PART" = quant ] || [ "$PART" = all ]; then
  run_part quant "$T_QUANT" python scripts/gpu_bench.py --backend cuda "${SIZE_ARGS[@]}" --only quantized
fi

# Tensor parallelism needs two devices: on fewer the part is skipped and tp.json says why.
if [ "$PART" = tp ] || [ "$PART" = all ]; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "${GPUS:-0}" -ge 2 ]; then
    run_part tp "$T_TP" python scripts/gpu_check_tp.py "$OUT/tp.json"
  else
    REASON="${GPUS:-0} CUDA device(s) here; tensor parallelism needs at least 2"
    echo "== tp: skipped: $REASON"
    printf '{"skipped": "%s"}\n' "$REASON" > "$OUT/tp.json"
  fi
fi

echo "== results in $OUT: $(cd "$OUT" && ls -d ./*.json logs/*.log 2>/dev/null | tr '\n' ' ')"
python - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}
print("parts:", load("check.json"))
k = load("kernels.json")
print(f"kernels: exit {k.get('exit_code')}, {k.get('tests')} tests, {k.get('failures')} failed, {k.get('errors')} errors, "
      f"{k.get('skipped')} skipped; real-shape tests run: {len(k.get('real_shape_tests', []))}")
for f in k.get("failed_tests", [])[:3]:
    print("  FAILED", f["test"], f["message"][:200])
sf, hf = load("splitfuse.json").get("sections", {}), load("hf.json").get("sections", {})
def get(tree, *keys):
    for key in keys:
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None
print("device:", load("splitfuse.json").get("meta", {}).get("device"), "| copy GB/s:", get(sf, "hardware", "copy_GBps"),
      "| decode lower bound ms:", get(sf, "hardware", "decode_lower_bound_ms"))
print("matmuls alone ms by M:", {m: r.get("ms") for m, r in (get(sf, "matmuls", "by_tokens") or {}).items()})
print("decode tokens/s by batch:", {b: r.get("tokens_per_s") for b, r in (get(sf, "decode") or {}).items() if isinstance(r, dict)})
print("generate tokens/s by batch: splitfuse", {b: r.get("tokens_per_s") for b, r in (get(sf, "generate", "by_batch") or {}).items()},
      "| HF", {b: r.get("tokens_per_s") for b, r in (get(hf, "generate", "by_batch") or {}).items()})
quant = get(sf, "quantized") or {}
print("batch-1 decode tokens/s (quant part):", {v: (quant.get(v) or {}).get("tokens_per_s") for v in ("unquantized", "int8", "int4")},
      "| speed-up int8", (quant.get("int8") or {}).get("speedup_vs_unquantized"), "int4", (quant.get("int4") or {}).get("speedup_vs_unquantized"))
print("offline requests/s: splitfuse", get(sf, "offline", "requests_per_s"), "| HF static", get(hf, "offline_static", "requests_per_s"),
      "| HF continuous batching", get(hf, "offline_cb", "requests_per_s"))
print("tensor parallelism:", load("tp.json") or "not run")
errors = {f"{src}:{name}": s.get("error") or s.get("skipped") for src, tree in (("splitfuse", sf), ("hf", hf))
          for name, s in tree.items() if isinstance(s, dict) and (s.get("error") or s.get("skipped"))}
if errors:
    print("sections failed or skipped:", errors)
print("GPU performance targets:")
for name, t in load("splitfuse.json").get("sections", {}).get("summary", {}).get("targets", {}).items():
    print(f"  {name:48s} {t.get('value')!s:>10} (target {t['target']}) {'' if t.get('met') is None else 'met' if t['met'] else 'NOT met'}")
EOF
exit $STATUS
