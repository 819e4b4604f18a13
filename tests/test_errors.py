"""Bad input through every command: one line naming the file and the key, no traceback (issue 13's list)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "c2a" / "data" / "assets" / "demo_tokenizer.model"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny"
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=600)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")
    return path


COMMANDS = {
    "train": lambda d, tmp: ["-m", "c2a.train", f"--out_dir={tmp / 'run'}", f"--model.checkpoint={d}", "--train.max_steps=1"],
    "generate": lambda d, tmp: ["-m", "c2a.generate", "--model", str(d), "--prompt", "hi"],
    "eval": lambda d, tmp: ["-m", "c2a.eval", "--model", str(d), "--data", "demo"],
    "convert": lambda d, tmp: ["-m", "c2a.model.convert", str(d), str(tmp / "converted")],
}


def test_a_truncated_safetensors_file_is_named_by_every_command(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    for name, command in COMMANDS.items():
        proc = cli(*command(broken, tmp_path))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert f"{weights}: not a readable safetensors file (SafetensorError" in proc.stderr, (name, proc.stderr[-2000:])


def test_a_config_value_of_the_wrong_type_is_named(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = "2"
    (broken / "config.json").write_text(json.dumps(config))
    proc = cli(*COMMANDS["generate"](broken, tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{broken / 'config.json'}: num_hidden_layers must be an integer, got str '2'" in proc.stderr


def test_convert_copies_the_tokenizer_and_writes_files_readable_as_usual(hf_dir, tmp_path):
    meta, back = tmp_path / "meta", tmp_path / "back"
    assert cli("-m", "c2a.model.convert", str(hf_dir), str(meta)).returncode == 0
    proc = cli("-m", "c2a.model.convert", str(meta), str(back))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for out in (meta, back):
        assert (out / "tokenizer.model").read_bytes() == DEMO_TOKENIZER.read_bytes()
    # and the converted directory works on its own: generate reads its tokenizer
    gen = cli("-m", "c2a.generate", "--model", str(back), "--prompt", "hi", "--max-new-tokens", "2")
    assert gen.returncode == 0, gen.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((back / "model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((back / "config.json").stat().st_mode)
