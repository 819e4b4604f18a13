"""Packed and padded micro-batches: whole examples, coverage, waste, sharding, resume, world-size independence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from c2a.data import TokenizedDataset, Tokenizer
from c2a.data.batching import MicroBatch, MicroBatchLoader, pack_best_fit_decreasing
from c2a.data.demo import DEMO_TOKENIZER, demo_split


class IdDataset:
    """Example i is (i + 1) repeated: input_ids say which example a token came from (0 is padding).
    Its first position is a prompt target (-100), the rest are trained."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.lengths[i])
        ids = np.full(n, i + 1, dtype=np.int32)
        labels = ids.copy()
        labels[0] = -100
        return ids, labels


def alpaca_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Prompts of 20-150 tokens, responses of 10-600 (log-normal, median 150): Alpaca-like."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 151, n) + np.clip(rng.lognormal(np.log(150), 0.9, n), 10, 600).astype(np.int64)


def split_row(mb: MicroBatch, b: int) -> list[tuple[int, int]]:
    """(example id or 0 for padding, length) of each document of row b, checking the row's invariants.
    A packed row restarts position_ids at every document; a padded row counts 0..T-1 over one example
    and its padding tail."""
    ids, labels, pos = mb.input_ids[b], mb.labels[b], mb.position_ids[b]
    T = len(ids)
    if torch.equal(pos, torch.arange(T)) and (ids != 0).any() and (ids == 0).any():  # one example + tail
        n = int((ids != 0).sum())
        assert (ids[n:] == 0).all() and (labels[n:] == -100).all(), "padding must follow the example and not be trained"
        bounds = [(0, n)]
    else:
        starts = (pos == 0).nonzero().flatten().tolist() + [T]
        bounds = list(zip(starts[:-1], starts[1:], strict=True))
    docs = []
    for s, e in bounds:
        seg = ids[s:e]
        assert torch.equal(pos[s:e], torch.arange(e - s)), "position_ids must count up from each document start"
        assert (seg == seg[0]).all(), "a document mixes two examples: an example was split or merged"
        if seg[0] == 0:
            assert (labels[s:e] == -100).all(), "padding must not be trained"
        else:
            assert labels[s] == -100 and (labels[s + 1 : e] == seg[0]).all()
        docs.append((int(seg[0]), e - s))
    return docs


def epoch_batches(loader: MicroBatchLoader) -> list[MicroBatch]:
    epoch = loader.epoch
    out = list(loader)
    assert loader.epoch == epoch + 1 and len(out) == loader.micro_batches_in_epoch(epoch)
    return out


def examples_of(mb: MicroBatch) -> list[int]:
    return [d for b in range(mb.input_ids.shape[0]) for d, _ in split_row(mb, b) if d]


def test_best_fit_decreasing() -> None:
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    bins = pack_best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins) and len(bins) == 3  # 26 units: 3 bins is optimal


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_every_example_once_per_epoch_never_split(mode: str) -> None:
    lengths = alpaca_like_lengths(700, seed=1)
    ds = IdDataset(lengths)
    loader = MicroBatchLoader(
        ds, mode=mode, seq_len=2048, micro_batch_size=3, global_batch_rows=6, seed=4, pack_window=256
    )
    orders = []
    for _epoch in range(2):
        seen = []
        for mb in epoch_batches(loader):
            B, T = mb.input_ids.shape
            assert B == 3 and mb.input_ids.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.long
            for b in range(B):
                docs = split_row(mb, b)
                for ex, n in docs:
                    if ex:
                        assert n == lengths[ex - 1], "an example was cut"
                        seen.append(ex - 1)
                if mode == "padded":  # one example per row, position_ids 0..T-1 over the whole row
                    assert len(docs) == 1 and torch.equal(mb.position_ids[b], torch.arange(T))
            if mode == "padded":  # padded to the longest example of the micro-batch
                assert T == max([lengths[e - 1] for e in examples_of(mb)], default=1)
            else:
                assert T == 2048
            assert mb.num_examples == len(examples_of(mb))
        assert sorted(seen) == list(range(700))
        orders.append(seen)
    assert orders[0] != orders[1], "each epoch must have its own order"


def test_packing_waste_on_alpaca_like_lengths() -> None:
    lengths = alpaca_like_lengths(6000, seed=2)
    loader = MicroBatchLoader(IdDataset(lengths), seq_len=2048, micro_batch_size=4, global_batch_rows=16, seed=0)
    real, rows = 0, 0
    for mb in epoch_batches(loader):
        nonempty = (mb.labels != -100).any(dim=1)
        rows += int(nonempty.sum())
        real += int((mb.input_ids[nonempty] != 0).sum())
    assert real == lengths.sum()
    waste = 1 - real / (rows * 2048)
    assert waste < 0.02, f"packing wastes {waste:.2%} of the positions"
    assert waste == pytest.approx(loader.padding_fraction(0))


def test_sizes_known_before_iterating_and_equal_per_rank() -> None:
    ds = IdDataset(alpaca_like_lengths(501, seed=3))
    G = 8
    for mode in ("packed", "padded"):
        loaders = [
            MicroBatchLoader(
                ds, mode=mode, seq_len=2048, micro_batch_size=2, global_batch_rows=G, rank=r, world_size=2, seed=1
            )
            for r in range(2)
        ]
        steps = loaders[0].steps_in_epoch(0)
        rows = loaders[0].rows_in_epoch(0)
        assert steps == -(-rows // G) and loaders[0].accum_steps == 2
        # the schedule's length: the optimizer steps a fresh loader really yields over 3 epochs
        fresh = MicroBatchLoader(
            ds, mode=mode, seq_len=2048, micro_batch_size=2, global_batch_rows=G, rank=0, world_size=2, seed=1
        )
        assert sum(len(epoch_batches(fresh)) for _ in range(3)) == fresh.total_steps(3) * fresh.accum_steps
        if mode == "padded":
            assert rows == 501
        per_rank = [epoch_batches(ld) for ld in loaders]
        assert len(per_rank[0]) == len(per_rank[1]) == steps * 2
        sets = [Counter(e for mb in batches for e in examples_of(mb)) for batches in per_rank]
        assert not set(sets[0]) & set(sets[1]), "ranks must see disjoint examples"
        assert sorted(set(sets[0]) | set(sets[1])) == list(range(1, 502)) and max((sets[0] + sets[1]).values()) == 1


def _rows_per_step(
    world_size: int, micro_batch_size: int, G: int, ds: IdDataset, mode: str, epochs: int = 1, state: dict | None = None
) -> list[list[tuple[tuple[int, ...], ...]]]:
    """For each optimizer step, the sorted rows (as tuples of example ids) that all ranks together used."""
    loaders = [
        MicroBatchLoader(
            ds,
            mode=mode,
            seq_len=512,
            micro_batch_size=micro_batch_size,
            global_batch_rows=G,
            rank=r,
            world_size=world_size,
            seed=9,
            pack_window=64,
        )
        for r in range(world_size)
    ]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    streams = []
    for ld in loaders:
        batches = []
        while ld.epoch < epochs:
            batches += list(ld)
        streams.append(batches)
    accum = loaders[0].accum_steps
    steps = []
    for s in range(len(streams[0]) // accum):
        rows = [
            tuple(d for d, _ in split_row(mb, b) if d)
            for stream in streams
            for mb in stream[s * accum : (s + 1) * accum]
            for b in range(micro_batch_size)
        ]
        steps.append(sorted(rows))
    return steps


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_rows_of_each_step_do_not_depend_on_world_size(mode: str) -> None:
    ds = IdDataset(np.random.default_rng(5).integers(20, 200, 300))
    reference = _rows_per_step(1, 2, 8, ds, mode)  # 1 rank x 4 micro-batches of 2
    assert len(reference) >= 3
    for world_size, micro in ((2, 2), (4, 2), (2, 4), (8, 1)):
        assert _rows_per_step(world_size, micro, 8, ds, mode) == reference, (world_size, micro)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_resume_mid_epoch_gives_identical_remaining_sequence(mode: str) -> None:
    ds = IdDataset(np.random.default_rng(6).integers(20, 300, 400))
    kw = dict(mode=mode, seq_len=1024, micro_batch_size=2, global_batch_rows=12, rank=1, world_size=2, seed=3)
    full = MicroBatchLoader(ds, **kw)
    reference = epoch_batches(full) + epoch_batches(full)
    for consumed in (0, 1, 5, 6, len(reference) // 2 - 1, len(reference) // 2, len(reference) // 2 + 3):
        first = MicroBatchLoader(ds, **kw)
        got = []
        while len(got) < consumed:  # may cross into the next epoch
            for mb in first:
                got.append(mb)
                if len(got) == consumed:
                    break
        state = first.state_dict()
        resumed = MicroBatchLoader(ds, **kw)
        resumed.load_state_dict(state)
        while resumed.epoch < 2:
            got += list(resumed)
        assert len(got) == len(reference)
        for a, b in zip(got, reference, strict=True):
            assert (
                torch.equal(a.input_ids, b.input_ids)
                and torch.equal(a.labels, b.labels)
                and torch.equal(a.position_ids, b.position_ids)
            )


def test_resume_with_another_world_size_at_a_step_boundary() -> None:
    ds = IdDataset(np.random.default_rng(7).integers(20, 200, 300))
    G = 8
    reference = _rows_per_step(1, 2, G, ds, "packed", epochs=2)
    # two ranks run 5 optimizer steps (2 micro-batches of 2 each per step), then save
    loaders = [
        MicroBatchLoader(
            ds, seq_len=512, micro_batch_size=2, global_batch_rows=G, rank=r, world_size=2, seed=9, pack_window=64
        )
        for r in range(2)
    ]
    for ld in loaders:
        it = iter(ld)
        for _ in range(5 * ld.accum_steps):
            next(it)
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict() and state["step"] == 5 and state["micro_step"] == 0
    resumed = _rows_per_step(4, 1, G, ds, "packed", epochs=2, state=state)
    assert resumed == reference[5:]
    # inside a step, the split cannot change
    it = iter(loaders[0])
    next(it)
    mid = loaders[0].state_dict()
    other = MicroBatchLoader(
        ds, seq_len=512, micro_batch_size=1, global_batch_rows=G, rank=0, world_size=4, seed=9, pack_window=64
    )
    with pytest.raises(ValueError, match="inside an optimizer step"):
        other.load_state_dict(mid)
    changed = MicroBatchLoader(ds, seq_len=512, micro_batch_size=2, global_batch_rows=G, seed=10, pack_window=64)
    with pytest.raises(ValueError, match="seed: saved 9, now 10"):
        changed.load_state_dict(state)


def test_end_of_epoch_padding_rows_are_untrained() -> None:
    ds = IdDataset(np.full(10, 100))  # 10 one-example rows in padded mode, G = 8: the 2nd step has 2 real rows
    loader = MicroBatchLoader(
        ds, mode="padded", seq_len=128, micro_batch_size=2, global_batch_rows=8, world_size=2, rank=1
    )
    batches = epoch_batches(loader)
    assert loader.steps_in_epoch(0) == 2 and len(batches) == 4
    # step 1's rows 8, 9 go to micro-batches 0 and 1 (rank 0 micro-step 0, rank 1 micro-step 0)
    assert batches[2].num_examples == 1 and batches[3].num_examples == 0
    assert (batches[3].labels == -100).all() and batches[3].input_ids.shape == (2, 1)


def test_deterministic_and_seedable() -> None:
    ds = IdDataset(alpaca_like_lengths(300, seed=8))
    kw = dict(seq_len=2048, micro_batch_size=2, global_batch_rows=4)
    a, b, c = (epoch_batches(MicroBatchLoader(ds, seed=s, **kw)) for s in (1, 1, 2))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))
    assert [examples_of(x) for x in a] != [examples_of(x) for x in c]


def test_invalid_configurations_are_refused() -> None:
    ds = IdDataset(np.array([10, 600]))
    with pytest.raises(ValueError, match="more than seq_len=512"):
        MicroBatchLoader(ds, seq_len=512, micro_batch_size=1, global_batch_rows=1)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        MicroBatchLoader(ds, seq_len=1024, micro_batch_size=3, global_batch_rows=8, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        MicroBatchLoader(ds, seq_len=1024, micro_batch_size=1, global_batch_rows=2, rank=2, world_size=2)


def test_demo_dataset_packs_into_demo_rows() -> None:
    tok = Tokenizer(DEMO_TOKENIZER)
    ds = TokenizedDataset.from_records(demo_split(n_train=2000, n_heldout=0)[0], tok, max_len=512)
    loader = MicroBatchLoader(ds, seq_len=512, micro_batch_size=8, global_batch_rows=16, pad_id=tok.eos_id)
    assert loader.padding_fraction(0) < 0.02
    mb = next(iter(loader))
    starts = (mb.position_ids[0] == 0).nonzero().flatten().tolist() + [512]
    for s, e in zip(starts[:-1], starts[1:], strict=True):  # every document starts with BOS, or is padding
        assert mb.input_ids[0, s] == tok.bos_id or (
            (mb.labels[0, s:e] == -100).all() and (mb.input_ids[0, s:e] == tok.eos_id).all()
        )
    first = mb.input_ids[0, starts[0] : starts[1]].tolist()
    assert tok.decode(first).startswith("Below is an instruction")
