#!/usr/bin/env bash
# Everything to run whenever a GPU is available, as one command (at most ~8 minutes on one H100):
#
#   benchmarks/gpu_check.sh [REPORT_DIR]          (default: $OUT if set, else benchmarks/results/gpu_check)
#
#   1. setup      the packages c2a needs are importable (c2a itself from this checkout via PYTHONPATH; no
#                 install, no network); versions, GPU and commit recorded
#   2. tests      the kernel tests on CUDA: pytest tests/test_kernels_*.py tests/test_attention*.py, with
#                 TRITON_INTERPRET unset so the compiled kernels run
#   3. train      benchmarks/train_throughput.py: c2a vs the HF/Alpaca stack on a Llama-2-7B-shaped model
#                 (8 of its 32 layers), rows of 2048 tokens; MFU and the ratios
#   4. attention  benchmarks/attention.py at T = 1024, 4096, 16384, head dim 128 (+ its GQA and packed cases)
#   5. kernels    benchmarks/kernels.py at 16384 tokens, without the torch.compile baselines (they take
#                 minutes to compile)
#   6. report     REPORT_DIR/gpu_check.md and gpu_check.json (every stage's status, time and key numbers),
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
    KERNEL_ARGS=()
    # Triton compiles each kernel specialisation on the CPU: spread the tests over 8 processes where
    # pytest-xdist is installed (it is on the device machines), all sharing the one GPU
    if "$PY" -c 'import xdist' 2>/dev/null; then TEST_ARGS=(-n 8); fi
else
    MODE=smoke
    export TRITON_INTERPRET=1
    SMOKE=(--smoke)
    TEST_ARGS=(--collect-only)
    KERNEL_ARGS=(--kernels rmsnorm,cross_entropy)  # the two launcher shapes (row-wise, chunked GEMM); all five take 17 s
fi

# seconds per stage; together ~7.5 minutes at most, so the whole check ends within 8
declare -A LIMITS=([setup]=60 [tests]=150 [train]=170 [attention]=60 [kernels]=50)

echo "gpu_check: $MODE mode, report in $DIR"
: >"$WORK/stages.tsv"
stage() {  # stage NAME COMMAND...: run it under its limit, log to $WORK/NAME.log, record status and time
    local name=$1 start rc
    shift
    echo "== $name: $*"
    start=$(date +%s%N)
    timeout --kill-after=15 "${LIMITS[$name]}" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "$*" >>"$WORK/stages.tsv"
    echo "   exit $rc ($(tail -n 1 "$WORK/$name.log" | cut -c1-150))"
}

stage setup "$PY" - "$WORK/setup.json" <<'EOF'
import importlib, json, platform, subprocess, sys
found, missing = {}, []
for name in ("torch", "triton", "numpy", "sentencepiece", "safetensors", "transformers", "matplotlib", "pytest", "c2a"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:  # any import failure is a missing requirement here
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch
info = {"python": platform.python_version(), "packages": found, "missing": missing,
        "cuda": torch.cuda.is_available(), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None}
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
stage train "$PY" benchmarks/train_throughput.py --out "$WORK/train" "${SMOKE[@]}"
stage attention "$PY" benchmarks/attention.py --out "$WORK/attention" --seqlens 1024,4096,16384 --head-dims 128 "${SMOKE[@]}"
stage kernels "$PY" benchmarks/kernels.py --out "$WORK/kernels" --tokens 16384 --no-compile "${SMOKE[@]}" "${KERNEL_ARGS[@]}"

# ------------------------------------------------------------------------------------------------ report
"$PY" - "$WORK" "$DIR" "$MODE" <<'EOF'
import datetime, json, shutil, sys, tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(name, n=25):
    try:
        return "\n".join((work / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


stages = []
for line in (work / "stages.tsv").read_text().splitlines():
    name, rc, millis, command = line.split("\t", 3)
    rc = int(rc)
    status = "pass" if rc == 0 else "timeout" if rc in (124, 137) else f"fail (exit {rc})"
    stages.append({"stage": name, "status": status, "exit": rc, "seconds": round(int(millis) / 1000, 1), "command": command})
report = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "setup": load(work / "setup.json"), "stages": stages}
md = [f"# gpu_check ({mode} mode)", ""]
env = report["setup"] or {}
md += [f"- date: {report['date']}", f"- commit: {env.get('commit')}", f"- device: {env.get('device')} {env.get('nvidia_smi', '')}".rstrip(),
       f"- packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}"]
if env.get("missing"):
    md.append(f"- MISSING: {'; '.join(env['missing'])}")
md += ["", "| stage | status | seconds |", "|---|---|---:|"] + [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]

# kernel tests
report["tests"] = None
if mode == "smoke":
    collected = next((l for l in tail("tests", 5).splitlines() if "collected" in l), None)
    report["tests"] = {"collected": collected}
    md += ["", "## Kernel tests (smoke: collected, not run; CI runs them under the interpreter)", str(collected)]
elif (work / "tests.xml").is_file():
    root = ET.parse(work / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    report["tests"] = {**counts, "failed": failed}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    md += ["", "## Kernel tests on CUDA",
           f"{counts['tests']} tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"]
    md += [f"- FAILED {name}" for name in failed[:40]]
else:  # pytest did not get as far as writing its report (timeout, import error)
    md += ["", "## Kernel tests on CUDA", "```", tail("tests"), "```"]

# training throughput
train = load(work / "train" / "train_throughput.json")
report["train"] = train
md += ["", "## Training throughput (benchmarks/train_throughput.py)"]
if train and "ratios" in train:
    c2a, base, s = train["sides"]["c2a"], train["sides"]["baseline"], train["setup"]
    md.append(f"dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads, vocab {s['vocab_size']}, rows of {s['seq_len']}, "
              f"{s['global_batch']} examples/step, {s['dtype']}")
    md += ["", "| | c2a | HF baseline | c2a / baseline |", "|---|---:|---:|---:|"]
    for label, key, fmt in (("trained tokens/s", "trained_tokens_per_s", "{:,.0f}"), ("all tokens/s", "tokens_per_s", "{:,.0f}"),
                            ("padding", "padding_fraction", "{:.1%}"), ("step s", "step_seconds", "{:.3f}"),
                            ("examples/step", "examples_per_step", "{:.1f}"), ("peak memory MiB", "peak_memory_mib", "{:,.0f}"),
                            ("model TFLOP/s", "model_tflops_per_s", "{:.1f}"), ("MFU", "mfu", "{:.1%}")):
        if c2a.get(key) is not None and base.get(key):
            md.append(f"| {label} | {fmt.format(c2a[key])} | {fmt.format(base[key])} | {c2a[key] / base[key]:.2f}x |")
    if mode == "gpu":
        mfu, speed = c2a.get("mfu"), train["ratios"]["trained_tokens_per_s"]
        md.append(f"\nGoals (issue 7): MFU >= 50%: {'met' if mfu and mfu >= 0.5 else 'NOT met'} ({mfu if mfu is None else f'{mfu:.1%}'}); "
                  f">= 2x baseline trained tokens/s: {'met' if speed >= 2 else 'NOT met'} ({speed:.2f}x)")
else:  # a side failed or ran out of time: what was measured, and the log
    for side, r in ((train or {}).get("sides") or {}).items():
        md.append(f"- {side}: {r['trained_tokens_per_s']:,.0f} trained tokens/s, peak {r['peak_memory_mib']:,.0f} MiB, MFU {r.get('mfu')}")
    md += ["```", tail("train"), "```"]

# attention
att = load(work / "attention" / "attention.json")
report["attention"] = att and {"summary": att.get("summary"), "environment": att.get("environment"),
                               "rows": [r for r in att.get("rows", []) if r.get("provider")]}
md += ["", "## Attention (benchmarks/attention.py)"]
if att:
    md += ["| case | provider | mode | B | T | H/K | Hd | ms | TFLOP/s |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['provider']} | {r['mode']} | {r['B']} | {r['T']} | {r['H']}/{r['K']} | {r['Hd']} | {r['ms']:.3f} | {r['tflops']:.1f} |"
           for r in att["rows"]]
    md += [f"- {k}: {v:.3f}" for k, v in (att.get("summary") or {}).items()]
else:
    md += ["```", tail("attention"), "```"]

# kernels
ker = load(work / "kernels" / "kernels.json")
report["kernels"] = ker
md += ["", "## Kernels (benchmarks/kernels.py)"]
if ker:
    md += ["| kernel | shape | mode | provider | ms | GB/s | TFLOP/s | peak MiB |", "|---|---|---|---|---:|---:|---:|---:|"]
    f = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    md += [f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {f(r.get('gbps'), '.0f')} | "
           f"{f(r.get('tflops'), '.1f')} | {f(r.get('peak_mb'), ',.0f')} |" for r in ker["rows"]]
else:
    md += ["```", tail("kernels"), "```"]

failed_stages = [s for s in stages if s["status"] != "pass"]
for s in failed_stages:
    md += ["", f"## {s['stage']}: {s['status']}, last lines of its log", "```", tail(s["stage"], 40), "```"]

(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
for src, dst in ((work / "train" / "train_throughput.json", "train_throughput.json"), (work / "train" / "train_throughput.png", "train_throughput.png"),
                 (work / "attention" / "attention.png", "attention.png"), (work / "kernels" / "kernels.png", "kernels.png")):
    if src.is_file():
        shutil.copyfile(src, out / dst)
with tarfile.open(out / "gpu_check_details.tar.gz", "w:gz") as tar:
    tar.add(work, arcname="gpu_check_details")
print("\n".join(md[: 12 + len(stages)]))
print(f"\nwrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'} and {out / 'gpu_check_details.tar.gz'}")
sys.exit(1 if failed_stages else 0)
EOF
