"""Bad input through every command: one line naming the file and the key, no traceback (issue 13's list)."""

from __future__ import annotations

import importlib
import importlib.util
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
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny"
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=600,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")
    return path


COMMANDS = {
    "train": lambda d, tmp: [
        "-m",
        "c2a.train",
        f"--out_dir={tmp / 'run'}",
        f"--model.checkpoint={d}",
        "--train.max_steps=1",
    ],
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
        assert f"{weights}: not a readable safetensors file (SafetensorError" in proc.stderr, (
            name,
            proc.stderr[-2000:],
        )


def test_a_config_value_of_the_wrong_type_is_named(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = "2"
    (broken / "config.json").write_text(json.dumps(config))
    proc = cli(*COMMANDS["generate"](broken, tmp_path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{broken / 'config.json'}: num_hidden_layers must be an integer, got str '2'" in proc.stderr


def test_a_special_token_id_of_the_wrong_type_is_named(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"eos_token_id": "two"}))
    proc = cli(*COMMANDS["convert"](broken, tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        f"{broken / 'config.json'}: eos_token_id must be a non-negative integer, a list of them or null, got str 'two'"
        in proc.stderr
    )


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


def train(out: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return cli(
        "-m",
        "c2a.train",
        f"--out_dir={out}",
        f"--data.path={data}",
        f"--data.tokenizer={DEMO_TOKENIZER}",
        "--data.max_len=64",
        "--train.global_batch=4",
        "--train.micro_batch=2",
        "--train.max_steps=1",
        "--train.progress=false",
        *args,
    )


def alpaca_lines(n: int, response: str = "the answer") -> str:
    return "".join(json.dumps({"instruction": f"question {i}", "output": response}) + "\n" for i in range(n))


def test_trainer_data_errors_name_the_line_and_the_trainer_flag(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(alpaca_lines(3) + '{"instruction": "no output"}\n')
    proc = train(tmp_path / "a", data)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{data}:4: " in proc.stderr and "(pass --data.skip_bad_rows=true to skip such rows)" in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert "--skip-bad-rows" not in proc.stderr  # prepare's flag, which the trainer rejects

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(alpaca_lines(2).encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    proc = train(tmp_path / "b", latin)
    assert proc.returncode == 1 and f"{latin}:3: not UTF-8 text (byte 0xe9 at offset " in proc.stderr, proc.stderr[
        -2000:
    ]


def test_over_length_examples_are_counted_and_the_policy_is_a_setting(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(alpaca_lines(6) + alpaca_lines(2, response=" ".join(["word"] * 200)))
    proc = train(tmp_path / "t", data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "data: 2 truncated of 8 examples longer than data.max_len=64 (data.truncation=drop leaves them out)"
        in proc.stderr
    )
    proc = train(tmp_path / "d", data, "--data.truncation=drop")
    assert proc.returncode == 0 and "data: 2 dropped of 8 examples longer than data.max_len=64" in proc.stderr
    assert "data: 6 examples" in proc.stderr
    # the run's own cache was made with one policy: resuming with the other says what to do
    proc = train(tmp_path / "d", data, "--data.truncation=truncate")
    assert proc.returncode == 1 and "truncation is 'drop', expected 'truncate'" in proc.stderr
    assert (
        "is this run's own cache, made when it started: resume with the data and settings it was started with"
        in proc.stderr
    )


def test_one_example_logs_the_padding_the_metrics_report(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(alpaca_lines(1))
    proc = train(tmp_path / "one", data, "--train.log_every=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = float(proc.stderr.split("padding ")[1].split("%")[0]) / 100
    measured = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["padding_fraction"]
    assert logged == pytest.approx(measured, abs=5e-5) and logged > 0.9


def test_tensorboard_without_the_package_fails_before_any_work(tmp_path):
    if importlib.util.find_spec("tensorboard") is not None:  # the test extras do not install it
        pytest.skip("tensorboard is installed here")
    proc = cli("-m", "c2a.train", f"--out_dir={tmp_path / 'tb'}", "--train.tensorboard=true")
    assert proc.returncode == 1 and "train.tensorboard = true needs the tensorboard package" in proc.stderr
    assert not (tmp_path / "tb").exists()  # nothing was made or loaded first


# Every command: a user error exits 1 with one "error: ..." line, a usage error exits 2 as argparse does.
# Each user error here needs no model, so the commands stop before loading one. The shells' main() run in
# this process; the trainer, which joins a process group, in its own.
SHELLS = {
    "plan": "c2a.plan.__main__",
    "generate": "c2a.generate",
    "eval": "c2a.eval",
    "prepare": "c2a.data.prepare",
    "convert": "c2a.model.convert",
    "plot": "c2a.train.plot",
    "demo": "c2a.data.demo.__main__",
    "compare": "c2a.train.compare",
}
USER_ERROR = {
    "plan": ["--gpus", "1", "--model.checkpoint={tmp}/nowhere"],
    "generate": ["--model", "{tmp}/nowhere", "--prompt", "hi"],
    "eval": ["--model", "{tmp}/nowhere", "--data", "{tmp}/missing.jsonl"],
    "prepare": ["--data", "{tmp}/missing.jsonl", "--tokenizer", str(DEMO_TOKENIZER), "--out", "{tmp}/cache"],
    "convert": ["{tmp}/nowhere", "{tmp}/out"],
    "plot": ["{tmp}"],
}
USAGE_ERROR = {
    "plan": ["--train.lr=1e-5"],
    "generate": ["--no-such-flag"],
    "eval": ["--model", "x", "--no-such-flag"],
    "prepare": ["--data", "x"],
    "convert": ["only-one-path"],
    "plot": [],
    "demo": ["--show", "many"],
}


def run_main(name: str, argv: list[str]) -> int:
    main = importlib.import_module(SHELLS[name]).main
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize("name", sorted(USER_ERROR))
def test_every_command_reports_a_user_error_in_one_line_and_exits_1(name, tmp_path, capsys):
    code = run_main(name, [a.replace("{tmp}", str(tmp_path)) for a in USER_ERROR[name]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, code, err[-2000:])


@pytest.mark.parametrize("name", sorted(USAGE_ERROR))
def test_every_command_exits_2_on_a_usage_error(name, capsys):
    assert run_main(name, USAGE_ERROR[name]) == 2, (name, capsys.readouterr().err[-2000:])


@pytest.mark.parametrize("name", sorted(SHELLS))
def test_every_command_prints_its_help(name, capsys):
    assert run_main(name, ["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_the_trainer_exits_1_on_a_user_error_and_2_on_a_usage_error(tmp_path):
    missing = cli(
        "-m",
        "c2a.train",
        f"--out_dir={tmp_path / 'run'}",
        f"--data.path={tmp_path / 'missing.jsonl'}",
        f"--data.tokenizer={DEMO_TOKENIZER}",
    )
    lines = [line for line in missing.stderr.splitlines() if "error:" in line]
    assert missing.returncode == 1 and len(lines) == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert cli("-m", "c2a.train", "--train.no_such_key=1").returncode == 2
