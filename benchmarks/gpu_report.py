"""The report of benchmarks/gpu_check.sh: reads its work folder (stages.tsv, the stage logs, each
benchmark's JSON) and writes REPORT_DIR/gpu_check.md, gpu_check.json, the plots and
gpu_check_details.tar.gz. A stage that failed or a benchmark row without a number is reported, never a
reason for the report itself to fail: it is what comes back from a scarce GPU run.

    python benchmarks/gpu_report.py WORK REPORT_DIR MODE        (MODE: gpu or smoke)
"""

import datetime
import json
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def f(value, spec):
    """A number formatted, or "" where a row has none (a provider that failed, a missing field)."""
    return "" if value is None else format(value, spec)


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
    stages.append(
        {"stage": name, "status": status, "exit": rc, "seconds": round(int(millis) / 1000, 1), "command": command}
    )
report = {
    "mode": mode,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "setup": load(work / "setup.json"),
    "stages": stages,
}
md = [f"# gpu_check ({mode} mode)", ""]
env = report["setup"] or {}
md += [
    f"- date: {report['date']}",
    f"- commit: {env.get('commit')}",
    f"- device: {env.get('device')} {env.get('nvidia_smi', '')}".rstrip(),
    f"- packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}",
]
if env.get("missing"):
    md.append(f"- MISSING: {'; '.join(env['missing'])}")
md += ["", "| stage | status | seconds |", "|---|---|---:|"] + [
    f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages
]


def pytest_stage(name, title):
    """A pytest stage: in smoke mode the collection line; on the GPU the counts, each failure, and (for the
    short end-to-end suite) every test's time, from its junit XML; the log's tail where pytest wrote none."""
    global md
    if mode == "smoke":
        collected = next((line for line in tail(name, 5).splitlines() if "collected" in line), None)
        md += ["", f"## {title} (smoke: collected, not run; CI runs them under the interpreter)", str(collected)]
        return {"collected": collected}
    if not (work / f"{name}.xml").is_file():  # pytest did not get as far as writing its report (timeout, import error)
        md += ["", f"## {title}", "```", tail(name), "```"]
        return None
    root = ET.parse(work / f"{name}.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = [
        {
            "test": f"{c.get('classname')}::{c.get('name')}",
            "seconds": float(c.get("time") or 0),
            "status": "failed"
            if c.find("failure") is not None or c.find("error") is not None
            else "skipped"
            if c.find("skipped") is not None
            else "passed",
        }
        for c in suite.iter("testcase")
    ]
    failed = [c["test"] for c in cases if c["status"] == "failed"]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    md += [
        "",
        f"## {title}",
        f"{counts['tests']} tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped",
    ]
    md += [f"- FAILED {test}" for test in failed[:40]]
    result = {**counts, "failed": failed}
    if len(cases) <= 40:
        result["cases"] = cases
        md += ["", "| test | status | seconds |", "|---|---|---:|"] + [
            f"| {c['test']} | {c['status']} | {c['seconds']:.1f} |" for c in cases
        ]
    return result


report["tests"] = pytest_stage("tests", "Kernel tests on CUDA")
report["gpu_path"] = pytest_stage("gpu_path", "End-to-end GPU path (tests/test_gpu_path.py: compiled kernels, bf16)")

# training throughput
train = load(work / "train" / "train_throughput.json")
report["train"] = train
md += ["", "## Training throughput (benchmarks/train_throughput.py)"]
sides = (train or {}).get("sides") or {}
if sides:
    s = train["setup"]
    md.append(
        f"dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads, vocab {s['vocab_size']}, rows of {s['seq_len']}, "
        f"{s['global_batch']} examples/step, {s['dtype']}; sides: c2a (defaults), c2a-new (gather_once, reduce_once, "
        "micro_batch_auto, activation_checkpointing auto), c2a-fp8 (c2a-new + fp8), baseline (HF + Alpaca's "
        "padding), peer (transformers + Liger-Kernel + packed rows + torch.compile)"
    )
    names = list(sides)
    md += ["", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, key, fmt in (
        ("trained tokens/s", "trained_tokens_per_s", "{:,.0f}"),
        ("all tokens/s", "tokens_per_s", "{:,.0f}"),
        ("padding", "padding_fraction", "{:.1%}"),
        ("step s", "step_seconds", "{:.3f}"),
        ("examples/step", "examples_per_step", "{:.1f}"),
        ("peak memory MiB", "peak_memory_mib", "{:,.0f}"),
        ("model TFLOP/s", "model_tflops_per_s", "{:.1f}"),
        ("MFU", "mfu", "{:.1%}"),
    ):
        if any(r.get(key) is not None for r in sides.values()):
            md.append(f"| {label} | " + " | ".join(f(sides[n].get(key), fmt[2:-1]) for n in names) + " |")
    for name, r in sides.items():  # each side's step: what it dispatches besides the matmuls
        rep = r.get("step_report")
        if rep:
            md.append(
                f"- {name} step report: {rep['aten_ops']:,} aten ops, {rep['triton_launches']:,} Triton launches, "
                f"FSDP copies + casts {rep['overhead_bytes_per_param']:.1f} bytes/parameter"
                + (f"; settings {r['settings']}" if r.get("settings") else "")
            )
    for name, why in (train.get("skipped") or {}).items():
        md.append(f"- {name}: {why}")
    for name, r in (train.get("failed") or {}).items():
        md.append(f"- {name}: FAILED ({r.get('error')})")
    comp = train.get("comparisons") or {}
    md += [f"- {k}: " + ", ".join(f"{m} {v:.2f}x" for m, v in ratios.items()) for k, ratios in comp.items()]
    if mode == "gpu":
        new, fp8, peer = (sides.get(n) or {} for n in ("c2a-new", "c2a-fp8", "peer"))

        def goal(ok, text):
            return f"{text}: {'met' if ok else 'NOT met' if ok is not None else 'not measured'}".replace(" ()", "")

        mfu = new.get("mfu")
        fp8_ratio = (comp.get("c2a-fp8 / c2a-new") or {}).get("trained_tokens_per_s")
        peer_ratio = comp.get("c2a-new / peer") or {}
        speed, memory = peer_ratio.get("trained_tokens_per_s"), peer_ratio.get("peak_memory_mib")
        md.append(
            "\nGoals (issue 24): "
            + "; ".join(
                (
                    goal(None if mfu is None else mfu >= 0.55, f"c2a-new MFU >= 55% ({f(mfu, '.1%')})"),
                    goal(
                        None if fp8_ratio is None else fp8_ratio >= 1.3,
                        f"fp8 >= 1.3x bf16 ({f(fp8_ratio, '.2f') and f(fp8_ratio, '.2f') + 'x'})",
                    ),
                    goal(
                        None if speed is None else speed >= 1.5 and memory <= 1.0,
                        ">= 1.5x the peer's trained tokens/s at <= its peak memory"
                        + (f" ({speed:.2f}x, memory {memory:.2f}x)" if speed is not None else ""),
                    ),
                )
            )
        )
if not sides or train.get("failed"):  # a side failed or ran out of time: the log
    md += ["```", tail("train"), "```"]
for name, r in sides.items():  # where one step's device time goes, for each side profiled
    prof = r.get("profile")
    if not prof:
        continue
    md += [
        "",
        f"{name}, one profiled step: {prof['wall_ms']:.1f} ms wall, {prof['device_busy_ms']:.1f} ms of kernels",
        "",
        "| kernel family | ms | share of kernel time |",
        "|---|---:|---:|",
    ]
    busy = prof["device_busy_ms"] or 1.0
    md += [f"| {k} | {v:.1f} | {v / busy:.1%} |" for k, v in prof["families_ms"].items()]
    md += ["", "| kernel | calls | ms |", "|---|---:|---:|"]
    md += [f"| `{k['name'][:90]}` | {k['calls']} | {k['ms']:.2f} |" for k in prof["top_kernels"][:12]]

# attention
att = load(work / "attention" / "attention.json")
report["attention"] = att and {
    "summary": att.get("summary"),
    "environment": att.get("environment"),
    "rows": [r for r in att.get("rows", []) if r.get("provider")],
}
md += ["", "## Attention (benchmarks/attention.py)"]
if att:
    md += ["| case | provider | mode | B | T | H/K | Hd | ms | TFLOP/s |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    md += [
        f"| {r['case']} | {r['provider']} | {r['mode']} | {r['B']} | {r['T']} | {r['H']}/{r['K']} | {r['Hd']} | "
        f"{f(r.get('ms'), '.3f')} | {f(r.get('tflops'), '.1f')} |"
        for r in att["rows"]
    ]
    md += [f"- {k}: {f(v, '.3f')}" for k, v in (att.get("summary") or {}).items()]
else:
    md += ["```", tail("attention"), "```"]

# attention tile sweep: times of each alternative tile, the others at their defaults
sw = load(work / "attention" / "attention_sweep.json")
report["sweep"] = sw and sw.get("sweep")
md += ["", "## Attention tiles (benchmarks/attention.py --sweep-only)"]
if sw:
    md += ["| case | kernel | BLOCK_M, BLOCK_N, warps, stages | mode | ms |", "|---|---|---|---|---:|"]
    md += [
        f"| {r.get('case', 'dense')} | {r['kernel']} | {r['blocks']}{' (default)' if r.get('default') else ''} | {r['mode']} | {f(r.get('ms'), '.3f')} |"
        for r in sw.get("sweep", [])
    ]
else:
    md += ["```", tail("sweep"), "```"]

# kernels
ker = load(work / "kernels" / "kernels.json")
report["kernels"] = ker
md += ["", "## Kernels (benchmarks/kernels.py)"]
if ker:
    md += [
        "| kernel | shape | mode | provider | ms | GB/s | TFLOP/s | peak MiB | note |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    md += [
        f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['provider']} | {f(r.get('ms'), '.3f')} | {f(r.get('gbps'), '.0f')} | "
        f"{f(r.get('tflops'), '.1f')} | {f(r.get('peak_mb'), ',.0f')} | {r.get('note') or ''} |"
        for r in ker["rows"]
    ]
    if ker.get("rmsnorm_backward_sweep"):
        md += [
            "",
            "RMSNorm backward launch settings (forward + backward, 7B width):",
            "",
            "| programs per SM | warps | ms |",
            "|---:|---:|---:|",
        ]
        md += [
            f"| {r['programs_per_sm']} | {r['warps']}{' (default)' if r['default'] else ''} | {f(r['ms'], '.3f')} |"
            for r in ker["rmsnorm_backward_sweep"]
        ]
else:
    md += ["```", tail("kernels"), "```"]

failed_stages = [s for s in stages if s["status"] != "pass"]
for s in failed_stages:
    md += ["", f"## {s['stage']}: {s['status']}, last lines of its log", "```", tail(s["stage"], 40), "```"]

(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
for src, dst in (
    (work / "train" / "train_throughput.json", "train_throughput.json"),
    (work / "train" / "train_throughput.png", "train_throughput.png"),
    (work / "attention" / "attention.png", "attention.png"),
    (work / "kernels" / "kernels.png", "kernels.png"),
):
    if src.is_file():
        shutil.copyfile(src, out / dst)
with tarfile.open(out / "gpu_check_details.tar.gz", "w:gz") as tar:
    tar.add(work, arcname="gpu_check_details")
print("\n".join(md[: 12 + len(stages)]))
print(f"\nwrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'} and {out / 'gpu_check_details.tar.gz'}")
sys.exit(1 if failed_stages else 0)
