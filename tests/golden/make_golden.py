"""Regenerates demo_loss_first_20_steps.json for tests/test_train.py::test_golden_demo_loss_curve.

    python tests/golden/make_golden.py

Only for an intended change of the demo run's numerics (data, tokenizer, init, model, loss, schedule):
the test exists to catch unintended ones.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "c2a.train",
            f"--out_dir={tmp}",
            "--train.progress=false",
            "--train.max_steps=20",
            "--train.log_every=1",
            "--eval.demo_accuracy=false",
        ],
        check=True,
        cwd=HERE.parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    losses = [json.loads(line)["loss"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
(HERE / "demo_loss_first_20_steps.json").write_text(json.dumps({"steps": 20, "loss": losses}, indent=1) + "\n")
print(losses)
