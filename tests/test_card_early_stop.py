"""The model card (c2a/train/card.py: final/README.md, `python -m c2a.eval --update-card`) and early stopping
(c2a/train/early_stop.py), on one short real run: fine-tuned from a small checkpoint that names a hub id and a
license, trained on responses that contradict its validation set's, so the validation loss rises."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_runs import checkpoint_tensors, metrics, run_train

from c2a.config import LlamaConfig, build_config
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.eval import main as eval_main
from c2a.model import Llama, save_pretrained
from c2a.train.card import base_model, write_cards

PATIENCE = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    base = tmp / "base"
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_name("demo")), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    (base / "README.md").write_text("---\nlicense: llama2\nlanguage:\n- en\n---\n# base\n")
    records = demo_split(80, 1)[0]
    # the training responses are always one thing, the validation responses another: as the model learns the
    # first, the second grows less likely
    train, val = tmp / "train.jsonl", tmp / "val.jsonl"
    train.write_text("".join(json.dumps({**r, "output": "one two three four"}) + "\n" for r in records[:64]))
    val.write_text("".join(json.dumps({**r, "output": "nine eight seven six"}) + "\n" for r in records[64:]))
    out = tmp / "run"
    args = [
        f"--model.checkpoint={base}",
        f"--data.path={train}",
        f"--data.tokenizer={DEMO_TOKENIZER}",
        f"--data.val_path={val}",
        "--eval.every=1",
        f"--train.early_stop_patience={PATIENCE}",
        "--train.max_steps=12",
        "--train.lr=3e-3",
        "--train.keep_last=1",
    ]
    proc = run_train(1, out, *args)
    return {"out": out, "val": val, "args": args, "log": proc.stdout + proc.stderr, "tmp": tmp}


def test_early_stop_fires_when_validation_loss_rises_and_exports_the_best(run, tmp_path):
    out, rows = run["out"], metrics(run["out"])
    losses = [r["val_loss"] for r in rows]  # eval.every=1: every step validated
    best = losses.index(min(losses))
    assert len(rows) == best + 1 + PATIENCE < 12, losses  # stopped PATIENCE validations after the best
    assert all(v >= losses[best] for v in losses[best + 1 :])
    assert "early stop" in run["log"]
    checkpoints = {p.name for p in (out / "checkpoints").iterdir()}
    assert checkpoints == {f"step_{best + 1:08d}", f"step_{len(rows):08d}"}  # keep_best turned on
    best_weights = checkpoint_tensors(out / "checkpoints" / f"step_{best + 1:08d}", tmp_path)["model"]
    last_weights = checkpoint_tensors(out / "checkpoints" / f"step_{len(rows):08d}", tmp_path)["model"]
    final = load_file(out / "final" / "model.safetensors")
    embedding = "model.embed_tokens.weight"
    assert torch.equal(final[embedding], best_weights["tok_embeddings.weight"])
    assert not torch.equal(final[embedding], last_weights["tok_embeddings.weight"])
    again = run_train(1, out, *run["args"])  # a run that stopped early is finished
    assert "already finished" in again.stdout + again.stderr


def front_matter(text: str) -> dict:
    head = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    assert head, text[:200]
    return yaml.safe_load(head.group(1))


def test_card_front_matter_and_values(run):
    out, rows = run["out"], metrics(run["out"])
    card = (out / "final" / "README.md").read_text()
    meta = front_matter(card)
    assert meta == {
        "base_model": "meta-llama/Llama-2-7b-hf",
        "library_name": "transformers",
        "tags": ["c2a", "llama", "sft"],
        "license": "llama2",
    }  # no datasets: the data is a local file, which is not hub metadata
    assert "| 16 sequences | 0.003 | 3 | 64 | 0 |" in card  # global batch, lr, epochs, max length, weight decay
    assert f"| final training loss | {rows[-1]['loss']:.4f} |" in card
    assert f"| validation loss | {rows[-1]['val_loss']:.4f} |" in card
    assert f"| best validation loss (exported) | {min(r['val_loss'] for r in rows):.4f} |" in card
    assert "train.jsonl" in card and "CPU" in card


def test_update_card_adds_the_evaluation_once(run, capsys):
    final = run["out"] / "final"
    for _ in range(2):  # a second evaluation replaces the first's section
        assert eval_main(["--model", str(final), "--data", str(run["val"]), "--update-card"]) == 0
    printed = capsys.readouterr().out
    card = (final / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "## Hardware and time" in card
    loss = re.search(r"loss\s+(\d+\.\d{4})", printed).group(1)
    assert f"loss         {loss}" in card.split("## Evaluation")[1]
    assert front_matter(card)["base_model"] == "meta-llama/Llama-2-7b-hf"


def test_base_model_only_for_hub_ids_and_the_adapter_card(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/llama-2-7b-hf"}))
    cfg = build_config({}, {"model.checkpoint": str(ckpt), "data.path": "tatsu-lab/alpaca"})
    assert base_model(cfg) is None
    assert (
        base_model(build_config({}, {"model.base_model": "meta-llama/Llama-2-13b-hf"})) == "meta-llama/Llama-2-13b-hf"
    )
    final = tmp_path / "final"
    (final / "adapter").mkdir(parents=True)
    summary = {"steps": 3, "final_loss": 1.5, "train_seconds": 2.0, "wall_seconds": 3.0}
    write_cards(final, cfg, summary, "1 x H100")
    meta, adapter = (front_matter((p / "README.md").read_text()) for p in (final, final / "adapter"))
    assert "base_model" not in meta and meta["datasets"] == ["tatsu-lab/alpaca"]
    assert adapter["library_name"] == "peft" and meta["library_name"] == "transformers"
    assert "lora" not in meta["tags"]
    lora = build_config({}, {"model.checkpoint": str(ckpt), "lora.rank": "16"})
    write_cards(final, lora, summary, "1 x H100")
    card = (final / "README.md").read_text()
    assert "lora" in front_matter(card)["tags"] and "LoRA rank" in card and "| 16 |" in card


def test_early_stop_config():
    with pytest.raises(ValueError, match="early_stop_patience"):
        build_config({}, {"train.early_stop_patience": "2"})  # no eval.every
    cfg = build_config({}, {"train.early_stop_patience": "2", "eval.every": "5", "data.val_fraction": "0.1"})
    assert cfg.train.keep_best
