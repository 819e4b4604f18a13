"""Every entry point a GPU user reaches, with every op on the Triton kernels (attention included), against
the same entry point on the torch references: a torchrun training run (2 gloo ranks, packed rows,
activation checkpointing full then selective), resume from a checkpoint the Triton path wrote, batched
generation (greedy and seeded sampling), and `python -m c2a.eval` with its answers file.

On CPU the kernels run in Triton's interpreter (`C2A_KERNELS=triton TRITON_INTERPRET=1`) in fp32; where CUDA
is present the same tests run the compiled kernels in bf16 on the GPU (benchmarks/gpu_check.sh runs them
there), on as many ranks as there are GPUs, at most 2. The model is tiny but has the shapes that catch
indexing bugs: GQA (4 query heads over 2 kv heads), head dim 16, an FFN width of 97, a vocabulary of 1000
(the demo tokenizer uses 512 of it). The runs are shared between tests (module fixtures) to keep the
module within ~3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2a.config import LlamaConfig
from c2a.model import Llama, load_pretrained, save_pretrained
from c2a.model.generate import generate_batch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
RANKS = min(2, torch.cuda.device_count()) if CUDA else 2
# Per-step losses of the two paths: fp32 sums in another order (CPU: measured at most 1.6e-7 apart over the
# 4 steps; a 1% error in the SwiGLU kernel's output moved step 4 by 1.7e-5), or bf16 activations rounded
# differently by the kernels and the references (GPU, 8 bits of mantissa).
LOSS_RTOL = 2e-2 if CUDA else 2e-6

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, ffn_hidden_dim=97, max_seq_len=128)
STEPS = 4
TRAIN = [
    "--data.path=demo",
    "--data.demo_train_size=96",
    "--data.demo_heldout_size=8",
    "--data.max_len=64",
    "--data.packing=true",
    "--train.micro_batch=1",
    "--train.global_batch=2",
    f"--train.max_steps={STEPS}",
    "--train.save_every=2",
    "--train.lr=3e-3",
    "--train.log_every=1",
    "--train.progress=false",
    "--eval.demo_accuracy=true",
    "--eval.max_examples=4",
    "--eval.max_new_tokens=4",
]


def env_for(kernels: str) -> dict[str, str]:
    env = {**os.environ, "C2A_KERNELS": kernels, "OMP_NUM_THREADS": "1"}
    if CUDA:
        env.pop("TRITON_INTERPRET", None)  # the compiled kernels
    else:
        env["TRITON_INTERPRET"] = "1"
    return env


def train(out: Path, kernels: str, *args: str) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"]
    cmd = [*launch, "-m", "c2a.train", f"--out_dir={out}", *TRAIN, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env_for(kernels))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The tiny model, randomly initialised, as an HF directory with the demo tokenizer: what the trainer
    fine-tunes (so the run gets this config, not a preset's)."""
    path = tmp_path_factory.mktemp("gpu_path") / "init"
    torch.manual_seed(0)
    save_pretrained(Llama(CFG), path)
    shutil.copy(ROOT / "c2a" / "data" / "assets" / "demo_tokenizer.model", path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory) -> dict[str, Path]:
    """torch: the reference run, no activation checkpointing. triton: the same run, every block
    checkpointed (full). resumed: the Triton run's directory copied, its step-4 checkpoint and export
    removed, and run again with selective checkpointing: it resumes from the Triton path's step-2
    checkpoint and trains steps 3 and 4 again."""
    base = tmp_path_factory.mktemp("runs")
    out = {"torch": base / "torch", "triton": base / "triton", "resumed": base / "resumed"}
    common = (f"--model.checkpoint={pretrained}",)
    train(out["torch"], "torch", *common, "--train.activation_checkpointing=none")
    proc = train(out["triton"], "triton", *common, "--train.activation_checkpointing=full")
    (out["triton"] / "train.log").write_text(proc.stdout + proc.stderr)
    shutil.copytree(out["triton"], out["resumed"])
    shutil.rmtree(out["resumed"] / "final")
    shutil.rmtree(out["resumed"] / "checkpoints" / f"step_{STEPS:08d}")
    proc = train(out["resumed"], "triton", *common, "--train.activation_checkpointing=selective", "--train.ac_every=2")
    (out["resumed"] / "train.log").write_text(proc.stdout + proc.stderr)
    return out


def test_training_losses_match_the_torch_path(runs):
    torch_losses, triton_losses = losses(runs["torch"]), losses(runs["triton"])
    assert list(torch_losses) == list(triton_losses) == list(range(1, STEPS + 1))
    assert triton_losses[STEPS] < triton_losses[1]  # it trained (lr 3e-3 over 4 steps)
    for step in torch_losses:
        assert triton_losses[step] == pytest.approx(torch_losses[step], rel=LOSS_RTOL), step
    # the trainer's demo evaluation (batched greedy generation on rank 0) ran before and after training
    log = (runs["triton"] / "train.log").read_text()
    assert log.count("demo held-out exact match") == 2, log[-3000:]


def test_resume_from_a_triton_checkpoint(runs):
    log = (runs["resumed"] / "train.log").read_text()
    assert "resumed from" in log and f"step_{2:08d}" in log, log[-3000:]
    whole, resumed = losses(runs["triton"]), losses(runs["resumed"])
    assert list(resumed) == list(range(1, STEPS + 1))
    for step in (3, 4):  # retrained after the resume, with selective instead of full checkpointing
        assert resumed[step] == pytest.approx(whole[step], rel=LOSS_RTOL / 10), step
    a = load_pretrained(runs["triton"] / "final", dtype=torch.float32).state_dict()
    b = load_pretrained(runs["resumed"] / "final", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        # GPU: the attention backward's fp32 atomics add dQ in a run-dependent order
        torch.testing.assert_close(b[name], a[name], rtol=1e-3 if CUDA else 1e-5, atol=1e-5 if CUDA else 1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# generation, in this process


@pytest.fixture(scope="module")
def model(pretrained) -> Llama:
    """The tiny model in the device's dtype. Not the trained export, so that these tests run without the
    training runs (`-k generation`); the eval tests below read the Triton run's export."""
    return load_pretrained(pretrained, dtype=DTYPE, device=DEVICE).eval()


PROMPTS = [[1, 37, 5, 99, 230, 12, 41], [1, 8], [1, 400, 401, 3, 77, 78, 90, 91, 92, 17, 18, 19, 250], [1, 60, 61, 62]]


def generate_with(kernels: str, model: Llama, monkeypatch, **kwargs) -> list[list[int]]:
    with monkeypatch.context() as m:
        m.setenv("C2A_KERNELS", kernels)
        return generate_batch(model, PROMPTS, max_new_tokens=6, stop_ids=(), **kwargs)


def assert_greedy_under(
    model: Llama, prompts: list[list[int]], outputs: list[list[int]], monkeypatch, tol: float
) -> None:
    """Each generated token is an argmax of the torch path's logits for its prefix, to within `tol`: greedy
    decoding that follows the reference model, whatever ties the kernels' rounding broke another way."""
    with monkeypatch.context() as m, torch.no_grad():
        m.setenv("C2A_KERNELS", "torch")
        for prompt, new in zip(prompts, outputs, strict=True):
            ids = torch.tensor([prompt + new], device=DEVICE)
            logits = model(ids)[0, len(prompt) - 1 : -1].float()  # [new, V]: the logits each token was chosen from
            chosen = logits.gather(1, torch.tensor(new, device=DEVICE)[:, None])[:, 0]
            assert torch.all(chosen >= logits.max(dim=1).values - tol), (prompt, new)


def test_batched_greedy_generation_matches_the_torch_path(model, monkeypatch):
    """Prompts of 2 to 13 tokens in one left-padded batch: the KV-cache path, whose last-position slice
    h[:, -1:] is row-strided for a batch (the RMSNorm launcher once refused it)."""
    ours = generate_with("triton", model, monkeypatch)
    assert [len(t) for t in ours] == [6] * len(PROMPTS)
    if not CUDA:
        assert ours == generate_with("torch", model, monkeypatch)
    assert_greedy_under(model, PROMPTS, ours, monkeypatch, tol=0.1 if CUDA else 1e-4)
    # each row alone gives what it gave in the batch (padding does not leak into a row)
    with monkeypatch.context() as m:
        m.setenv("C2A_KERNELS", "triton")
        alone = [generate_batch(model, [p], max_new_tokens=6, stop_ids=())[0] for p in PROMPTS]
    assert alone == ours if not CUDA else sum(a == o for a, o in zip(alone, ours)) >= len(PROMPTS) - 1


def test_seeded_sampling(model, monkeypatch):
    ours = generate_with("triton", model, monkeypatch, temperature=1.0, top_p=0.9, seed=7)
    assert ours == generate_with("triton", model, monkeypatch, temperature=1.0, top_p=0.9, seed=7)  # reproducible
    assert ours != generate_with("triton", model, monkeypatch, temperature=1.0, top_p=0.9, seed=8)
    if not CUDA:  # the same logits to fp32 rounding: the same draws
        assert ours == generate_with("torch", model, monkeypatch, temperature=1.0, top_p=0.9, seed=7)


def test_generation_stays_within_the_tokenizer(pretrained, monkeypatch):
    """A model whose vocabulary is padded past its tokenizer's (here 1000 over the demo tokenizer's 512, which
    the trainer accepts) must not generate an id the tokenizer cannot decode: the trainer's demo evaluation
    crashed on one ("piece id is out of range")."""
    padded = load_pretrained(pretrained, dtype=DTYPE, device=DEVICE).eval()
    with torch.no_grad():
        padded.output.weight[:512] = 0  # the tokenizer's ids get logit 0, so one of the 488 others wins
    free = generate_with("triton", padded, monkeypatch)
    limited = generate_with("triton", padded, monkeypatch, vocab_size=512)
    assert all(t >= 512 for row in free for t in row)
    assert all(0 <= t < 512 for row in limited for t in row)


# ---------------------------------------------------------------------------------------------------------
# python -m c2a.eval


@pytest.fixture(scope="module")
def evals(runs, tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("eval")
    results = {}
    for kernels in ("torch", "triton"):
        json_out, answers = base / f"{kernels}.json", base / f"{kernels}_answers.json"
        cmd = [
            sys.executable,
            "-m",
            "c2a.eval",
            "--model",
            str(runs["triton"] / "final"),
            "--data",
            "demo",
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "5",
            "--alpaca-eval-out",
            str(answers),
            "--json-out",
            str(json_out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env_for(kernels))
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[kernels] = {
            **json.loads(json_out.read_text()),
            "answers": json.loads(answers.read_text()),
            "stdout": proc.stdout,
        }
    return results


def test_eval_cli_matches_the_torch_path(evals):
    ours, ref = evals["triton"], evals["torch"]
    assert ours["examples"] == 6 and ours["targets"] == ref["targets"] > 0
    assert ours["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)
    assert ours["perplexity"] == pytest.approx(ref["perplexity"], rel=2 * LOSS_RTOL)
    assert ours["exact_match"]["examples"] == 6 and "exact match" in ours["stdout"]
    assert [a["instruction"] for a in ours["answers"]] == [a["instruction"] for a in ref["answers"]]
    assert all(a["generator"] == "final" for a in ours["answers"])
    if not CUDA:  # greedy answers from the same logits to fp32 rounding
        assert ours["answers"] == ref["answers"] and ours["exact_match"] == ref["exact_match"]


# ---------------------------------------------------------------------------------------------------------
# The CUDA branches of c2a/, forced on CPU where they can be (the table in benchmarks/RESULTS.md lists them all)


def test_kernel_switch_defaults_to_triton_on_cuda(monkeypatch):
    from c2a.kernels import backend

    monkeypatch.delenv("C2A_KERNELS", raising=False)
    assert backend(torch.device("cuda")) == "triton" and backend(torch.device("cpu")) == "torch"


def test_rmsnorm_backward_uses_four_programs_per_sm_on_cuda(monkeypatch):
    from c2a.kernels import rmsnorm

    monkeypatch.setattr(rmsnorm, "_sm_count", lambda index: 132)  # an H100 SXM's SMs
    assert rmsnorm._bwd_programs(16384, torch.device("cuda")) == 528
    assert rmsnorm._bwd_programs(100, torch.device("cuda")) == 100  # never more programs than rows
    assert rmsnorm._bwd_programs(16384, torch.device("cpu")) == 4


def test_model_loss_with_prompt_rows_kept_as_on_cuda(monkeypatch):
    """On CUDA the model does not drop the untrained rows before the head (llama.py: finding them is a host
    sync); the Triton loss then gets every row, prompts included. Forced here by making the row selection
    keep every row: the same loss and gradients as with the rows dropped."""
    import c2a.model.llama as llama

    torch.manual_seed(0)
    tiny = Llama(CFG).to(DEVICE, DTYPE)
    ids = torch.randint(3, 512, (2, 13), device=DEVICE)
    labels = ids.roll(-1, dims=1)
    labels[:, :5] = -100  # the prompts
    labels[1, -1] = -100

    def loss_and_grads(keep_every_row: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with monkeypatch.context() as m:
            m.setenv("C2A_KERNELS", "triton")
            if keep_every_row:
                m.setattr(llama, "_trained_rows", lambda h, labels: (h, labels))
            tiny.zero_grad()
            loss = tiny.loss(ids, labels)
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters()}

    dropped, grads_dropped = loss_and_grads(False)
    kept, grads_kept = loss_and_grads(True)
    tol = dict(rtol=2e-2, atol=1e-3) if CUDA else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kept, dropped, **tol)
    for name in grads_dropped:
        torch.testing.assert_close(grads_kept[name], grads_dropped[name], **tol, msg=lambda m: f"{name}: {m}")


def test_cli_device_and_dtype_defaults(monkeypatch):
    from c2a.inference import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cuda:1", "fp16") == (torch.device("cuda", 1), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="--dtype must be auto, fp32, bf16, fp16; got 'fp8'"):
        resolve_device(None, "fp8")
