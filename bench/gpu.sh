#!/usr/bin/env bash
# bench/gpu.sh: the GPU checks and benchmarks of nanoseek as one prepared script, for a machine with a CUDA GPU, no
# network and only what a bare CUDA image holds (torch, triton, maybe transformers). It installs nothing: each part
# whose package is missing is skipped with a one-line reason. Total under 8 minutes (each part under `timeout`,
# inside one overall deadline). Writes docs/benchmarks-gpu.md (or --out FILE) and keeps the raw logs.
#
#   bash bench/gpu.sh                 # on a GPU machine, from anywhere
#   bash bench/gpu.sh --dry-run       # every part on the CPU with tiny settings: tests the script (numbers meaningless)
#   bash bench/gpu.sh --out /tmp/b.md --logs /tmp/logs
#
# Without a CUDA GPU the script runs the dry run by itself (and says so). Parts:
#   (a) the GPU test subset: tests/test_gpu.py (engine, compiled decode, bf16, pretrain step on the device) and
#       tests/test_flash_mla.py (the Triton kernel against the torch path; its CUDA tests run only on a GPU)
#   (b) decode: nanoseek's engine (eager, then compiled: CUDA graphs) vs transformers `generate`, batch 1/16/64
#       (bench/decode.py, `small` preset, bfloat16)
#   (c) the FlashMLA kernel vs the torch path at V3's widths, batch 1/16/64, context 1k/4k (bench/flash_mla.py)
#   (d) MFU of the `small` preset's pretraining step, nanoseek and transformers (bench/train_step.py)
# They run in the order a, b1, c, d, b2: the compiles of b2 take the least certain time and get what is left.
set -u

cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
DEADLINE=$((START + ${GPU_BENCH_BUDGET:-450}))   # 7 min 30 s by default: each part's budget is cut to what is left
DRY=0
OUTFILE=docs/benchmarks-gpu.md
LOGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTFILE=$2; shift ;;
    --logs) LOGS=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option $1 (expected --dry-run, --out FILE, --logs DIR)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$LOGS" ] || LOGS=$(mktemp -d /tmp/nanoseek-gpu-bench.XXXXXX)
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

say() { echo "[gpu.sh $(($(date +%s) - START))s] $*"; }

# --- the python that holds torch: one whose torch sees a GPU first, else any with torch ------------------------
PY=""
for want in cuda torch; do
  for c in ${PYTHON:-} .venv/bin/python python3 python; do
    command -v "$c" >/dev/null 2>&1 || continue
    if [ "$want" = cuda ]; then check="import torch, sys; sys.exit(not torch.cuda.is_available())"; else check="import torch"; fi
    if "$c" -c "$check" >/dev/null 2>&1; then PY=$c; break 2; fi
  done
done
if [ -z "$PY" ]; then
  echo "bench/gpu.sh: no python with torch found (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
  exit 1
fi

# --- what is here (one line per fact: key=value) -----------------------------------------------------------------
"$PY" - >"$LOGS/env.txt" 2>/dev/null <<'EOF'
import importlib, platform, sys
import torch
print("python=" + sys.version.split()[0] + " (" + sys.executable + ")")
print("torch=" + torch.__version__)
print("cuda=" + ("1" if torch.cuda.is_available() else "0"))
print("gpu=" + (torch.cuda.get_device_name() if torch.cuda.is_available() else ""))
print("cpu=" + (platform.processor() or platform.machine()))
def version(name, attrs=()):
    try:
        m = importlib.import_module(name)
        for a in attrs:                     # names a part needs (a lazy module raises on first use)
            getattr(m, a)
        return getattr(m, "__version__", "?")
    except Exception:
        return ""
print("triton=" + version("triton"))
print("transformers=" + version("transformers"))
print("transformers_v3=" + version("transformers", ["DeepseekV3ForCausalLM", "DeepseekV3Config"]))
print("trl=" + version("trl"))
print("pytest=" + version("pytest"))
print("safetensors=" + version("safetensors"))
EOF
env_of() { sed -n "s/^$1=//p" "$LOGS/env.txt"; }
ver() { local v; v=$(env_of "$1"); echo "${v:-not installed}"; }
HAS_CUDA=$(env_of cuda)
if [ "$HAS_CUDA" != 1 ] && [ "$DRY" = 0 ]; then
  say "torch sees no CUDA GPU here: running the dry run (every part on the CPU, tiny settings)"
  DRY=1
fi
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
say "python: $PY; torch $(env_of torch); gpu: $(env_of gpu); triton $(ver triton); transformers $(ver transformers); dry run: $DRY"

# --- running a part: budget, timeout, log, status -----------------------------------------------------------------
NAMES=(); STATUS=(); SECS=(); declare -A NOTE=() GPU_CMD=()
run_part() {    # run_part ID TITLE BUDGET_S CMD...   (stdout + stderr to $LOGS/ID.log)
  local id=$1 title=$2 budget=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - 5))
  [ "$budget" -gt "$left" ] && budget=$left
  echo "$*" >"$LOGS/$id.cmd"
  if [ "$budget" -lt 15 ]; then
    skip_part "$id" "$title" "the script's time budget is spent (${left}s left)"
    return
  fi
  say "$title: $* (timeout ${budget}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$LOGS/$id.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) STATUS+=("ok") ;;
    124|137) STATUS+=("timed out after ${budget}s (output so far below)") ;;
    *) STATUS+=("failed (exit $rc)") ;;
  esac
  NAMES+=("$id|$title"); SECS+=("$dt")
  say "$title: ${STATUS[-1]} in ${dt}s"
}
skip_part() {   # skip_part ID TITLE REASON
  NAMES+=("$1|$2"); STATUS+=("skipped: $3"); SECS+=("0")
  say "$2: skipped: $3"
}

# --- the parts (GPU settings; the dry run's stand-ins on the CPU) --------------------------------------------------
# on a GPU (also named in the dry run's report, beside each part's stand-in)
DEV=cuda; DTYPE=bfloat16; PRESET=small; PROMPT=128; NEW=64; BATCHES=1,16,64; CBATCHES=1,16,64; REPEAT=3
TRAIN=(--preset small --batch 16 --seq 1024 --steps 9); FLASH=(--device cuda --dtype bfloat16)
DECODE_ARGS="--device $DEV --dtype $DTYPE --preset $PRESET --prompt-lens $PROMPT --new-tokens $NEW --repeat $REPEAT"
GPU_CMD=([a]="python3 -m pytest -q -rs tests/test_gpu.py tests/test_flash_mla.py"
         [b1]="python3 bench/decode.py $DECODE_ARGS --batches $BATCHES"
         [b2]="python3 bench/decode.py $DECODE_ARGS --batches $CBATCHES --compile"
         [c]="python3 bench/flash_mla.py ${FLASH[*]}" [d]="python3 bench/train_step.py --device $DEV ${TRAIN[*]}")
if [ "$DRY" = 1 ]; then
  DEV=cpu; DTYPE=bfloat16; PRESET=tiny; PROMPT=8; NEW=8; BATCHES=1,2,4; CBATCHES=1,2; REPEAT=1
  TRAIN=(--preset tiny --batch 2 --seq 32 --steps 3 --threads 1 --peak-tflops 1); FLASH=(--device cpu --tiny)
  export NANOSEEK_TEST_DEVICE=cpu
  NOTE[a]="NANOSEEK_TEST_DEVICE=cpu: tests/test_gpu.py's checks on the CPU; test_flash_mla.py's CUDA tests skip."
  NOTE[b1]="Batches 1, 2, 4 stand in for 1, 16, 64 (bfloat16 as on a GPU; slow on this CPU)."
  NOTE[b2]="Inductor's C++ backend here; CUDA graphs (reduce-overhead) on a GPU."
  NOTE[c]="Triton's interpreter (numpy, one program at a time): the kernel is slower than torch by design here."
  NOTE[d]="MFU against a nominal 1 TFLOP/s peak (--peak-tflops 1); on a GPU, the GPU's dense bf16 peak."
fi

if [ -z "$(env_of pytest)" ]; then
  skip_part a "GPU test subset" "pytest is not installed"
else
  run_part a "GPU test subset" 90 "$PY" -m pytest -q -rs -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_gpu.py tests/test_flash_mla.py
fi

DECODE=("$PY" bench/decode.py --device "$DEV" --dtype "$DTYPE" --preset "$PRESET" --prompt-lens "$PROMPT"
        --new-tokens "$NEW" --repeat "$REPEAT")
NO_HF=""
if [ -z "$(env_of transformers_v3)" ]; then
  why="transformers (the reference side) is not installed"
  [ -n "$(env_of transformers)" ] && why="transformers $(env_of transformers) has no DeepseekV3ForCausalLM (the reference side)"
  skip_part b1 "decode, eager engine vs transformers" "$why"
  NO_HF=$why
else
  run_part b1 "decode, eager engine vs transformers" 80 "${DECODE[@]}" --batches "$BATCHES"
fi

if [ -z "$(env_of triton)" ]; then
  skip_part c "FlashMLA kernel vs torch path" "triton is not installed (the kernel's language)"
elif [ "$DRY" = 1 ]; then
  run_part c "FlashMLA kernel vs torch path" 50 env TRITON_INTERPRET=1 "$PY" bench/flash_mla.py "${FLASH[@]}"
else
  run_part c "FlashMLA kernel vs torch path" 50 "$PY" bench/flash_mla.py "${FLASH[@]}"
fi

if [ -z "$(env_of transformers_v3)" ]; then
  run_part d "pretraining step and MFU (nanoseek only: no transformers)" 80 \
    "$PY" bench/train_step.py --device "$DEV" "${TRAIN[@]}" --no-transformers
else
  run_part d "pretraining step and MFU" 80 "$PY" bench/train_step.py --device "$DEV" "${TRAIN[@]}"
fi

# last: the compiles take the longest and least certain time; it gets what is left of the budget
if [ -n "$NO_HF" ]; then
  skip_part b2 "decode, compiled engine vs transformers" "$NO_HF"
elif [ "$DEV" = cuda ] && [ -z "$(env_of triton)" ]; then
  skip_part b2 "decode, compiled engine vs transformers" "triton is not installed (torch.compile's GPU backend)"
else
  run_part b2 "decode, compiled engine vs transformers" 150 "${DECODE[@]}" --batches "$CBATCHES" --compile
fi

# --- the report ------------------------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
ORDER=()        # the parts' indices in the order a, b1, b2, c, d (they ran a, b1, c, d, b2)
for want in a b1 b2 c d; do
  for i in "${!NAMES[@]}"; do [ "${NAMES[$i]%%|*}" = "$want" ] && ORDER+=("$i"); done
done
clean() {   # a log without progress bars, warnings and their source lines
  tr '\r' '\n' <"$1" | grep -v -E 'it/s\]|s/it\]|Warning|warnings\.warn|^\s*$|^  warn\(' | tail -n 60
}
{
  echo "# GPU benchmarks (bench/gpu.sh)"
  echo
  if [ "$DRY" = 1 ]; then
    echo "> **CPU DRY RUN: the numbers below are meaningless.** Every part ran on the CPU with tiny stand-in"
    echo "> settings, only to test the script itself. ${GPU_BENCH_NOTE:-No GPU machine was at hand for this run.}"
    echo "> On a GPU machine: \`bash bench/gpu.sh\` (under 8 minutes; installs nothing) rewrites this file."
    echo
  fi
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); total $TOTAL s; command: \`bash bench/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`"
  if command -v nvidia-smi >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1)"
  else
    echo "- GPU: none (torch.cuda.is_available() is False)"
  fi
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') x $(getconf _NPROCESSORS_ONLN 2>/dev/null)"
  echo "- python $(env_of python); torch $(env_of torch); triton $(ver triton); transformers $(ver transformers); TRL $(ver trl) (no part uses TRL: bench/grpo.py is its comparison)"
  echo
  echo "| part | status | seconds |"
  echo "| --- | --- | --- |"
  for i in "${ORDER[@]}"; do
    echo "| (${NAMES[$i]%%|*}) ${NAMES[$i]#*|} | ${STATUS[$i]} | ${SECS[$i]} |"
  done
  for i in "${ORDER[@]}"; do
    id=${NAMES[$i]%%|*}
    echo
    echo "## (${id}) ${NAMES[$i]#*|}"
    echo
    if [[ ${STATUS[$i]} == skipped* ]]; then
      echo "${STATUS[$i]}"
      continue
    fi
    echo "\`$(sed "s|$REPO/||g" "$LOGS/$id.cmd")\` ($([ "$DRY" = 1 ] && echo "CPU dry run" || echo "GPU"); ${STATUS[$i]}, ${SECS[$i]} s)"
    if [ "$DRY" = 1 ]; then
      echo
      echo "${NOTE[$id]:-} On a GPU: \`${GPU_CMD[$id]:-}\`"
    fi
    echo
    echo '```text'
    clean "$LOGS/$id.log"
    echo '```'
  done
} >"$OUTFILE"
say "wrote $OUTFILE (logs in $LOGS) in ${TOTAL}s"
