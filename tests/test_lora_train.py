"""LoRA training end to end on 2 gloo ranks (one torchrun for every variant: tests/lora_train_runs.py) against a
reference loop of PEFT + transformers + torch AdamW on the same batches.

Variants: an untied Llama with adapters on all seven linears, and a tied-embedding one with q/v adapters and
rslora, each continuing a PEFT-saved adapter (lora.init_adapter) with packing, full activation checkpointing,
gradient accumulation and weight decay. Checked: per-step losses equal the reference's (1e-4 relative); the
frozen base bit-unchanged (a tied head still the embedding); a resume from the step-3 checkpoint bitwise equal
to the uninterrupted run; a resume on another base refused naming what changed; the checkpoint holds only the
adapters; final/adapter/ loads in PEFT with c2a's logits and final/ equals PEFT's merge_and_unload; with
validation (data.val_fraction, eval.every), finite validation losses, and a real SIGTERM stopping every rank
at one step with a checkpoint, the resumed run ending with the uninterrupted run's losses, validation losses
and adapters (bitwise); train.cpu_offload with the same losses, gradient norms and adapters as without.

QLoRA (lora.quantize = nf4, in the same launch): a Llama whose q projection has more than 256 NF4 blocks (so
the row order it is quantized in matters) trained with every step's loss equal to the reference loop's on a
transformers model whose block linears hold bitsandbytes' NF4 round trip; the codes sliced across ranks and
equal to the base's quantized; a bitwise resume; a resume without quantization refused; the checkpoint holds
the adapters only; final/ equal to PEFT's model on the dequantized base, quantization.json beside the adapter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file
from train_runs import ROOT, metrics, step_rows, trainer_state

from c2a.data import TokenizedDataset
from c2a.data.demo import DEMO_TOKENIZER, demo_split
from c2a.model import load_pretrained

peft = pytest.importorskip("peft", reason="pip install -e '.[lora]' (PEFT is LoRA's oracle)")

# variant: (tied embeddings, PEFT target_modules, rslora)
VARIANTS = {
    "untied": (False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "tied": (True, ["q_proj", "v_proj"], True),
}
STEPS = 6
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# QLoRA's base: q_proj 192 x 192 = 576 NF4 blocks, three second-level scales (blocks of 256); every in-dim a
# multiple of 64 (bitsandbytes 0.50's CPU dequantize_4bit is wrong for an even last dim of 32 mod 64)
QLORA_SIZES = {"hidden_size": 192, "intermediate_size": 128}


def make_base(path, tied: bool, hidden_size: int = 64, intermediate_size: int = 96) -> None:
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=520,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    shutil.copyfile(DEMO_TOKENIZER, path / "tokenizer.model")


def make_adapter(base, path, targets: list[str], rslora: bool) -> None:
    """A PEFT adapter saved by PEFT, with random A and B (B = 0 would hide a wrong B layout at step 1)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(base)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs, then the one torchrun over every variant."""
    work = tmp_path_factory.mktemp("lora_train")
    records = demo_split(64, 4, seed=1)[0]
    (work / "alpaca.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n" for r in records)
    )
    for variant, (tied, targets, rslora) in VARIANTS.items():
        make_base(work / variant / "base", tied)
        make_adapter(work / variant / "base", work / variant / "init_adapter", targets, rslora)
    make_base(work / "qlora" / "base", False, **QLORA_SIZES)
    make_adapter(work / "qlora" / "base", work / "qlora" / "init_adapter", ALL_LINEARS, False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "lora_train_runs.py"), str(work), *VARIANTS, "qlora"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return work


def hf_documents(row):
    """A packed row's documents (position_ids restart at 0), each as (ids, positions, labels) for transformers."""
    ids, pos, labels = row.input_ids[0], row.position_ids[0], row.labels[0]
    starts = [*(pos == 0).nonzero().flatten().tolist(), len(pos)]
    return [(ids[a:b], pos[a:b], labels[a:b]) for a, b in zip(starts, starts[1:]) if b > a]


@torch.no_grad()
def bnb_round_trip(hf) -> None:
    """In place: every block linear's weight replaced by bitsandbytes' NF4 quantize + dequantize of it."""
    bnb = pytest.importorskip("bitsandbytes.functional", reason="pip install -e '.[bitsandbytes]' (QLoRA's oracle)")
    for layer in hf.model.layers:
        for linear in [*(getattr(layer.self_attn, n) for n in ALL_LINEARS[:4]), *layer.mlp.children()]:
            if isinstance(linear, torch.nn.Linear):
                q, state = bnb.quantize_4bit(linear.weight, blocksize=64, quant_type="nf4", compress_statistics=True)
                linear.weight.copy_(bnb.dequantize_4bit(q, state))


def reference_losses(work, variant: str) -> list[float]:
    """PEFT + transformers + torch AdamW on the rows of each of the run's steps, with its logged lr (QLoRA: on
    the NF4 round trip of the base's block linears)."""
    out = work / variant / "full"
    hf = transformers.LlamaForCausalLM.from_pretrained(work / variant / "base", attn_implementation="eager")
    if variant == "qlora":
        bnb_round_trip(hf)
    model = peft.PeftModel.from_pretrained(hf, work / variant / "init_adapter", is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    dataset = TokenizedDataset.open(out / "data_cache")
    rows = trainer_state(out / "checkpoints" / "step_00000003")["data"]["global_batch_rows"]
    losses = []
    for step, record in enumerate(metrics(out)[:STEPS], start=1):
        batch = step_rows(dataset, step, rows, mode="packed", seq_len=64)
        targets = sum(int((b.labels != -100).sum()) for b in batch)
        loss = 0.0
        for b in batch:
            for ids, pos, labels in hf_documents(b):
                logits = model(input_ids=ids[None], position_ids=pos[None]).logits[0]
                loss = loss + torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        loss = loss / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = record["lr"]
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_losses_match_peft_reference_loop(work, variant):
    ours = [r["loss"] for r in metrics(work / variant / "full")]
    assert [r["step"] for r in metrics(work / variant / "full")] == list(range(1, STEPS + 1))
    ref = reference_losses(work, variant)
    assert ours == pytest.approx(ref, rel=1e-4), (ours, ref)
    assert ours[-1] < ours[0] - 0.05  # it trained (lr 1e-2 on 4 rows a step)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_frozen_base_bit_unchanged_and_checkpoint_holds_adapters_only(work, variant):
    tied, targets, _ = VARIANTS[variant]
    frozen = json.loads((work / variant / "frozen.json").read_text())
    # 2 layers x (7 linears + 2 norms) + embedding + final norm (+ head when untied)
    assert frozen == {"frozen": 2 * 9 + 2 + (not tied), "changed": [], "tied": tied}
    ckpt = work / variant / "full" / "checkpoints" / "step_00000006"
    keys = {k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")}
    assert len(keys) == 2 * 2 * len(targets) and all(k.endswith(("lora_A", "lora_B")) for k in keys), keys


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_is_bitwise(work, variant):
    full, resumed = work / variant / "full", work / variant / "resumed"
    a, b = (
        load_file(full / "final/adapter/adapter_model.safetensors"),
        load_file(resumed / "final/adapter/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(full)]
    init = load_file(work / variant / "init_adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the adapters trained


def test_resume_on_another_base_is_refused(work):
    untied = (work / "untied" / "changed.txt").read_text()
    assert "trained adapters on another base model (config.tie_word_embeddings False -> True" in untied, untied
    assert "files.model.safetensors" in untied
    tied = (work / "tied" / "changed.txt").read_text()
    assert "(config.norm_eps 1e-06 -> 1e-05)" in tied, tied


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_loads_in_peft_and_equals_merge(work, variant):
    final, base = work / variant / "full" / "final", work / variant / "base"
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and config["task_type"] == "CAUSAL_LM"
    hf = transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf, final / "adapter").eval()
    ours = load_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(3, 520, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        merged = loaded.merge_and_unload().state_dict()
    exported = load_file(final / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6, msg=key)


def test_hsdp_trains_as_fsdp(work):
    """train.replicas = 2 (each rank a full replica, gradients all-reduced): the same losses and adapters as FSDP."""
    fsdp, hsdp = work / "untied" / "full", work / "untied" / "hsdp"
    assert [r["loss"] for r in metrics(hsdp)] == pytest.approx([r["loss"] for r in metrics(fsdp)], rel=1e-5)
    a = load_file(fsdp / "final/adapter/adapter_model.safetensors")
    b = load_file(hsdp / "final/adapter/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_validation_and_sigterm_stop_resume_as_uninterrupted(work):
    """data.val_fraction + eval.every with LoRA: finite validation losses at steps 2, 4, 6; a real SIGTERM
    stops every rank at one step with a checkpoint, and the resumed run ends as the uninterrupted one."""
    val, stopped = work / "untied" / "val", work / "untied" / "stopped"
    report = json.loads((work / "untied" / "stopped.json").read_text())
    assert report == {"stopped": 4, "checkpoint": str(stopped / "checkpoints" / "step_00000004")}, report
    ours = {r["step"]: r["val_loss"] for r in metrics(val) if "val_loss" in r}
    assert sorted(ours) == [2, 4, 6] and all(math.isfinite(v) for v in ours.values()), ours
    resumed = {r["step"]: r["val_loss"] for r in metrics(stopped) if "val_loss" in r}
    assert resumed == ours
    assert [r["step"] for r in metrics(stopped)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics(stopped)] == [r["loss"] for r in metrics(val)]
    a = load_file(val / "final/adapter/adapter_model.safetensors")
    b = load_file(stopped / "final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the held-out quarter is not trained on: fewer rows than full/ saw, so other losses
    assert [r["loss"] for r in metrics(val)] != [r["loss"] for r in metrics(work / "untied" / "full")]


def test_cpu_offload_trains_as_without(work):
    """train.cpu_offload (FSDP2's CPUOffloadPolicy: compute-dtype frozen shards, fp32 adapters, their gradients
    and AdamW state on the host): the same per-step losses, gradient norms and adapters as without it."""
    plain, offload = work / "untied" / "full", work / "untied" / "offload"
    assert [r["step"] for r in metrics(offload)] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in metrics(plain)], [r[key] for r in metrics(offload)]
        assert b == pytest.approx(a, rel=1e-6), (key, a, b)
    a = load_file(plain / "final/adapter/adapter_model.safetensors")
    b = load_file(offload / "final/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


def test_qlora_losses_equal_peft_on_bitsandbytes_nf4_round_trip(work):
    """Every step's loss (step 1: the same adapters on the same batch) equals PEFT's on a transformers model whose
    block linears hold bitsandbytes' NF4 round trip; the loss falls."""
    ours = [r["loss"] for r in metrics(work / "qlora" / "full")]
    assert len(ours) == STEPS
    ref = reference_losses(work, "qlora")
    assert ours == pytest.approx(ref, rel=1e-4), (ours, ref)
    assert ours[-1] < ours[0] - 0.05


def test_qlora_codes_sharded_and_checkpoint_holds_adapters_only(work):
    frozen = json.loads((work / "qlora" / "frozen.json").read_text())
    # 2 layers x 7 NF4 bases; 2 x 2 norms, embedding, final norm, head unquantized and bit-unchanged
    assert frozen == {
        "frozen": 2 * 2 + 3, "changed": [], "tied": False, "nf4": 14, "nf4_sliced_on_every_rank": 14, "nf4_changed": []
    }  # fmt: skip
    ckpt = work / "qlora" / "full" / "checkpoints" / "step_00000006"
    keys = {k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")}
    assert len(keys) == 2 * 2 * 7 and all(k.endswith(("lora_A", "lora_B")) for k in keys), keys


def test_qlora_resume_is_bitwise_and_unquantized_resume_refused(work):
    full, resumed = work / "qlora" / "full", work / "qlora" / "resumed"
    a, b = (load_file(d / "final/adapter/adapter_model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(full)]
    changed = (work / "qlora" / "changed.txt").read_text()
    assert "trained adapters on another base model (quantization.format nf4 -> None)" in changed, changed


def test_qlora_export_is_the_dequantized_base_plus_adapter(work):
    """final/ gives PEFT's logits on a transformers model built from the dequantized base (bitsandbytes' round
    trip) with final/adapter/; quantization.json beside it, adapter_config.json without a quantization key."""
    final, base = work / "qlora" / "full" / "final", work / "qlora" / "base"
    hf = transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
    bnb_round_trip(hf)
    loaded = peft.PeftModel.from_pretrained(hf, final / "adapter").eval()
    ours = load_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(3, 520, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    record = json.loads((final / "adapter" / "quantization.json").read_text())
    assert record["bnb_4bit_quant_type"] == "nf4" and record["bnb_4bit_blocksize"] == 64
    assert record["bnb_4bit_use_double_quant"] is True and record["bnb_4bit_compute_dtype"] == "float32"
    assert sorted(record["quantized_modules"]) == sorted(ALL_LINEARS)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert not any("quant" in key for key in config), config
    assert "(QLoRA, 6 optimizer steps)" in (final / "README.md").read_text()  # the model cards say which is which
    assert "this model is that dequantized base plus the adapter" in (final / "README.md").read_text()
    assert "not into the original weights" in (final / "adapter" / "README.md").read_text()
