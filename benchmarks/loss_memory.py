"""Peak memory of Llama.loss (chunked, no full logits) against cross-entropy on the full logits.

    python benchmarks/loss_memory.py [--tokens 8192] [--dim 256] [--vocab 32000] [--layers 2]

Each variant runs forward + backward in a fresh process, so the peak RSS (CPU) or max allocated memory
(CUDA) belongs to that variant alone. Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing


def run_variant(variant: str, tokens: int, dim: int, vocab: int, layers: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from c2a.config import LlamaConfig
    from c2a.model import Llama

    torch.manual_seed(0)
    cfg = LlamaConfig(dim=dim, n_layers=layers, n_heads=max(1, dim // 64), vocab_size=vocab, max_seq_len=tokens)
    model = Llama(cfg).to(device)
    T = min(tokens, 2048)
    ids = torch.randint(0, vocab, (tokens // T, T), device=device)
    labels = ids.roll(-1, dims=1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if variant == "chunked":
        loss = model.loss(ids, labels)
    else:
        loss = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten())
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"variant": variant, "loss": loss.item(), "seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.dim, args.vocab, args.layers, device)))
        return
    rows = []
    for variant in ("chunked", "full-logits"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "dim", "vocab", "layers")
        ]
        rows.append(
            json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        )
    print(
        f"device {device}; {args.tokens} tokens x dim {args.dim} -> vocab {args.vocab}, {args.layers} layers, forward+backward"
    )
    print(f"{'variant':<12} {'peak MB':>9} {'seconds':>8} {'loss':>8}")
    for r in rows:
        print(f"{r['variant']:<12} {r['peak_mb']:>9.0f} {r['seconds']:>8.2f} {r['loss']:>8.4f}")
    print(f"chunked / full-logits peak memory: {rows[0]['peak_mb'] / rows[1]['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
