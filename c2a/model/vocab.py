"""Growing the vocabulary: model.add_pad_token.

The released claude2-alpaca model added a pad token to Llama-2's 32000 pieces (vocab 32001) and set the new
embedding row and the new output-head row to the mean of the existing rows (Stanford Alpaca's
smart_tokenizer_and_embedding_resize). The head row is not inert: its logit enters every softmax of
training, so the run is not the same as one at vocab 32000 even if the pad id never appears.

`AddedRowsReader` applies this to a checkpoint as it is read, so the trainer builds, shards and fills the
larger model directly (no rank ever holds a resized copy of the whole model) and exports it as trained.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from c2a.model.weights import CheckpointReader

# the [V, D] matrices: a tied model has only the first (its head is the same tensor)
VOCAB_MATRICES = ("tok_embeddings.weight", "output.weight")


def with_mean_rows(matrix: torch.Tensor, n_new: int) -> torch.Tensor:
    """[V, D] -> [V + n_new, D]: the new rows are the mean of the existing ones (taken in fp32, stored in
    the matrix's dtype)."""
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)  # [1, D]
    return torch.cat([matrix, mean.expand(n_new, -1)])


class AddedRowsReader:
    """A CheckpointReader whose vocabulary has `n_new` more rows, mean-initialised (see the module doc)."""

    def __init__(self, reader: CheckpointReader, n_new: int = 1) -> None:
        if n_new < 1:
            raise ValueError(f"AddedRowsReader: n_new must be >= 1, got {n_new}")
        self.reader, self.n_new = reader, n_new
        self.config = reader.config.replace(vocab_size=reader.config.vocab_size + n_new)

    def __getattr__(self, name: str):  # path, format, names, named_ids, dtype: the checkpoint's own
        return getattr(self.reader, name)

    def get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        return with_mean_rows(t, self.n_new) if name in VOCAB_MATRICES else t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.reader.names:
            yield name, self.get(name)
