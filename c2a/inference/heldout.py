"""Held-out loss: the mean cross-entropy over every response + EOS target, exactly the training objective.

One function sums a model's target losses over micro-batches (`target_loss_sum`): `python -m c2a.eval`
feeds it padded batches of records, and the trainer's validation (c2a.train.validation) the training
loader's micro-batches on the sharded model, then sums over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from c2a.data import IGNORE_INDEX, Tokenizer, encode_example
from c2a.data.batching import MicroBatch
from c2a.model import Llama


@torch.no_grad()
def target_loss_sum(model: torch.nn.Module, batches: Iterable[MicroBatch], device: torch.device) -> torch.Tensor:
    """[sum of the target losses, number of targets] (float64, on `device`) over `batches`; the model is
    put in eval mode for it and back."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for mb in batches:
        mb = mb.to(device)
        # normalizer 1: the loss comes back as the sum over this batch's targets
        loss = model.loss(
            mb.input_ids, mb.labels, position_ids=mb.position_ids, normalizer=1.0, num_trained=mb.num_trained
        )
        sums[0] += loss.double()
        sums[1] += mb.num_trained  # counted on the host when the batch was built
    model.train(was_training)
    return sums


def padded_batches(
    tok: Tokenizer, records: Sequence[dict[str, str]], max_len: int, batch_size: int
) -> list[MicroBatch]:
    """Records encoded as training encodes them (`encode_example`), batched by length, longest first, and
    right-padded (padding targets -100) so little compute goes to padding; the order does not change a sum."""
    encoded = [encode_example(r, tok, max_len) for r in records]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]), reverse=True)
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        T = len(chunk[0][0])
        ids = torch.full((len(chunk), T), tok.eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (x, y) in enumerate(chunk):
            ids[b, : len(x)] = torch.tensor(x)
            labels[b, : len(y)] = torch.tensor(y)
        positions = torch.arange(T).expand(len(chunk), T)  # right padding: plain causal attention per row
        batches.append(MicroBatch(ids, labels, positions, len(chunk), num_trained=int((labels != IGNORE_INDEX).sum())))
    return batches


def heldout_loss(
    model: Llama, tok: Tokenizer, records: Sequence[dict[str, str]], max_len: int, batch_size: int
) -> tuple[float, int]:
    """(mean cross-entropy over every response + EOS target of `records`, number of targets)."""
    device = next(model.parameters()).device
    total, targets = target_loss_sum(model, padded_batches(tok, records, max_len, batch_size), device).tolist()
    return total / max(targets, 1.0), int(targets)
