#!/usr/bin/env bash
# Everything to run whenever a GPU is available, as one command (at most 7.5 minutes: the stage limits below):
#
#   benchmarks/gpu_check.sh [REPORT_DIR]          (default: $OUT if set, else benchmarks/results/gpu_check)
#   GPU_CHECK_COMMIT=<hash> benchmarks/gpu_check.sh "$OUT"   (on a lent machine: the commit the report names)
#
#   1. setup      the packages c2a needs are importable (c2a itself from this checkout via PYTHONPATH; no
#                 install, no network); versions, GPU and commit recorded
#   2. tests      the kernel tests on CUDA: pytest tests/test_kernels_*.py tests/test_attention*.py, with
#                 TRITON_INTERPRET unset so the compiled kernels run
#   3. gpu_path   tests/test_gpu_path.py compiled on the GPU in bf16: every entry point (torchrun training with
#                 activation checkpointing, resume, batched generation, python -m c2a.eval) with all kernels
#                 on Triton against the torch path, on as many ranks as GPUs (at most 2)
#   4. train      benchmarks/train_throughput.py on a Llama-2-7B-shaped model (8 of its 32 layers), rows of 2048
#                 tokens, five sides, each in its own process under its own budget (SIDE_BUDGET_S there:
#                 c2a 30 s, c2a-new 25, c2a-fp8 20, baseline 30, peer 40): c2a's defaults; the new settings
#                 (gather_once, reduce_once, micro_batch_auto, activation_checkpointing auto); those in fp8; the
#                 HF/Stanford Alpaca baseline; and the peer stack (transformers + Liger-Kernel's fused RMSNorm,
#                 SwiGLU, RoPE and linear cross-entropy + packed rows without padding + torch.compile). Per side:
#                 MFU, trained tokens/s, peak memory, the step report (aten ops and bytes by family, Triton
#                 launches); the c2a sides also one profiled step (device busy vs wall). Liger-Kernel comes from
#                 a wheel carried with the checkout (the device machine has no network): put it there first with
#                   pip download liger-kernel --no-deps -d benchmarks/wheels
#                 (or set LIGER_WHEEL=<file>); without one the peer side is skipped, and the report says so
#   5. attention  benchmarks/attention.py at T = 1024, 4096, 16384, head dim 128 (+ its GQA and packed cases)
#   6. kernels    benchmarks/kernels.py at 16384 tokens, without the torch.compile baselines (they take
#                 minutes to compile), and the RMSNorm backward's programs-per-SM and warps sweep
#   7. sweep      benchmarks/attention.py --sweep-only: each attention kernel's default tile beside its
#                 alternatives at T 4096, Hd 128, dense and (forward, dK/dV) on packed Alpaca-like rows;
#                 results kept as they come
#   8. report     benchmarks/gpu_report.py: REPORT_DIR/gpu_check.md and gpu_check.json (every stage's status, time and key numbers),
#                 the training JSON and the three plots, and gpu_check_details.tar.gz (all logs and outputs):
#                 7 files, within what a device run sends back (8).
#
# Each stage runs under its own time limit (see LIMITS) and a failing stage does not stop the others; the
# exit status is 0 only if every stage passed. Without CUDA (or with GPU_CHECK_SMOKE=1) the same stages run in
# smoke mode: tests are collected but not run (CI runs them under the interpreter), the benchmarks run their
# --smoke modes with the same arguments, so CI keeps this script working (tests/test_gpu_check_smoke.py).
# PYTHON selects the interpreter (default: python3, which holds torch on the device machines).

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu_check}}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [[ "${GPU_CHECK_SMOKE:-0}" != 1 ]] && "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    MODE=gpu
    unset TRITON_INTERPRET  # compiled kernels, not the interpreter
    SMOKE=()
    TEST_ARGS=()
    PATH_ARGS=()  # one process: the suite's tests share its training runs (module fixtures)
    KERNEL_ARGS=(--sweep-rmsnorm)
    TRAIN_ARGS=(--steps 3 --warmup 1)  # 1 untimed + 3 timed steps a side: five sides in 150 s
    # Triton compiles each kernel specialisation on the CPU: spread the tests over 8 processes where
    # pytest-xdist is installed (it is on the device machines), all sharing the one GPU
    if "$PY" -c 'import xdist' 2>/dev/null; then TEST_ARGS=(-n 8); fi
else
    MODE=smoke
    export TRITON_INTERPRET=1
    SMOKE=(--smoke)
    TEST_ARGS=(--collect-only)
    PATH_ARGS=(--collect-only)
    TRAIN_ARGS=()  # the smoke setup's own (1 + 2 steps of a tiny model)
    KERNEL_ARGS=()  # all five kernels (17 s): tests/test_gpu_check_smoke.py checks each against its reference
fi

# seconds per stage; together 450 s at most, so that one run and the machine's start (~30 s on an H200) leave a lent card's
# 15 minutes room for a second, shorter run (the sweep keeps whatever it measured when its limit ends). gpu_path: three
# torchrun runs of a 2-layer model (each compiling the kernels it has not cached yet), two eval CLIs and the
# in-process generation; reasoned, not yet timed on a GPU (2-3 min on 2 CPU cores interpreted, where the
# kernels are 100x slower but nothing compiles). train: its five sides' budgets (145 s) and the parent's start.
# The attention and kernel benchmarks time each case for 40 ms instead of do_bench's 100 (--rep-ms), which
# pays for the train stage's 60 more seconds.
declare -A LIMITS=([setup]=20 [tests]=80 [gpu_path]=90 [train]=150 [attention]=50 [kernels]=35 [sweep]=25)
# Smoke mode interprets the kernels on a CPU that other jobs may share: the GPU budgets stay as written above,
# and smoke mode scales them by GPU_CHECK_LIMIT_SCALE (default 4), so that a loaded 2-core machine does not fail
# a stage that only ran slowly (the attention stage took 75 s there once under a load of 15).
if [[ $MODE == smoke ]]; then
    for name in "${!LIMITS[@]}"; do LIMITS[$name]=$(( LIMITS[$name] * ${GPU_CHECK_LIMIT_SCALE:-4} )); done
fi
# GPU_CHECK_STAGES="attention sweep" runs only those stages (a rerun of what failed or changed); setup always runs
STAGES=" setup ${GPU_CHECK_STAGES:-tests gpu_path train attention kernels sweep} "

echo "gpu_check: $MODE mode, report in $DIR"
: >"$WORK/stages.tsv"
stage() {  # stage NAME COMMAND...: run it under its limit, log to $WORK/NAME.log, record status and time
    local name=$1 start rc
    shift
    [[ "$STAGES" == *" $name "* ]] || return 0
    echo "== $name: $*"
    start=$(date +%s%N)
    timeout --kill-after=15 "${LIMITS[$name]}" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "$*" >>"$WORK/stages.tsv"
    echo "   exit $rc ($(tail -n 1 "$WORK/$name.log" | cut -c1-150))"
}

stage setup "$PY" - "$WORK/setup.json" <<'EOF'
import importlib, json, os, platform, subprocess, sys
found, missing = {}, []
for name in ("torch", "triton", "numpy", "sentencepiece", "safetensors", "transformers", "matplotlib", "pytest", "c2a"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:  # any import failure is a missing requirement here
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch
info = {"python": platform.python_version(), "packages": found, "missing": missing,
        "cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        # the device machine's copy of the checkout carried a stale .git on 2026-12-04 (it named the session's
        # first commit for later ones): the caller names the commit it sent
        "commit": os.environ.get("GPU_CHECK_COMMIT")
                  or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu_memory_gib=p.total_memory / 2**30, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
sys.exit(1 if missing else 0)
EOF

stage tests "$PY" -m pytest tests/test_kernels_*.py tests/test_attention*.py -q -p no:cacheprovider \
    --junitxml="$WORK/tests.xml" "${TEST_ARGS[@]}"
stage gpu_path "$PY" -m pytest tests/test_gpu_path.py -q -p no:cacheprovider --junitxml="$WORK/gpu_path.xml" "${PATH_ARGS[@]}"
# the peer side's Liger-Kernel: the carried wheel unpacked (pure Python) into a folder only the train stage sees
LIGER_WHEEL=${LIGER_WHEEL:-$(ls "$ROOT"/benchmarks/wheels/liger_kernel-*.whl 2>/dev/null | tail -n 1)}
TRAIN_PATH=$PYTHONPATH
if [[ -n "$LIGER_WHEEL" && -f "$LIGER_WHEEL" ]] && "$PY" -m zipfile -e "$LIGER_WHEEL" "$WORK/liger" 2>/dev/null; then
    TRAIN_PATH="$PYTHONPATH:$WORK/liger"
    echo "   peer stack: $(basename "$LIGER_WHEEL")"
else
    echo "   peer stack skipped: liger-kernel wheel not found (pip download liger-kernel --no-deps -d benchmarks/wheels)"
fi
SIDES=c2a,c2a-new,c2a-fp8,baseline,peer
stage train env PYTHONPATH="$TRAIN_PATH" "$PY" benchmarks/train_throughput.py --out "$WORK/train" --sides "$SIDES" \
    "${TRAIN_ARGS[@]}" --profile --report "${SMOKE[@]}"
# the planner's peak for each c2a side beside its torch.cuda.max_memory_allocated: train/plan_vs_measured.json, lines in train.log
[[ -f "$WORK/train/train_throughput.json" ]] && "$PY" benchmarks/plan_vs_measured.py \
    "$WORK/train/train_throughput.json" >>"$WORK/train.log" 2>&1 && echo "   $(tail -n 1 "$WORK/train.log" | cut -c1-150)"
stage attention "$PY" benchmarks/attention.py --out "$WORK/attention" --seqlens 1024,4096,16384 --head-dims 128 \
    --rep-ms 40 "${SMOKE[@]}"
stage kernels "$PY" benchmarks/kernels.py --out "$WORK/kernels" --tokens 16384 --no-compile --rep-ms 40 "${SMOKE[@]}" \
    "${KERNEL_ARGS[@]}"
stage sweep "$PY" benchmarks/attention.py --out "$WORK/attention" --sweep-only --rep-ms 40 "${SMOKE[@]}"

# ------------------------------------------------------------------------------------------------ report
"$PY" benchmarks/gpu_report.py "$WORK" "$DIR" "$MODE"
