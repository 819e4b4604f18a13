"""Generation with the KV cache: greedy tokens equal HF transformers' `generate` on the same weights (MHA
and GQA), batched equals one by one, stop ids, seeded nucleus sampling, and the sampled frequencies of a
crafted two-token distribution."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from c2a.config import LlamaConfig
from c2a.model import Llama, load_pretrained
from c2a.model.generate import generate, generate_batch, sample

CONFIGS = {
    "mha": LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=301, ffn_hidden_dim=96, norm_eps=1e-6),
    "gqa": LlamaConfig(
        dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=257, ffn_hidden_dim=160, rope_theta=500000.0
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Decoding runs thousands of tiny ops: with two intra-op threads on a shared 2-core machine, OpenMP's
    spinning made each 1-token matmul take ~1.4 ms instead of ~20 us (a test went 27 s -> 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_llama(cfg: LlamaConfig) -> transformers.LlamaForCausalLM:
    """A random HF LlamaForCausalLM of the same shape. Weights at std 0.3 (norms around 1 with spread 0.5)
    give varied, confident next-token choices, so greedy paths are long and ties are far apart."""
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.3) + (1.0 if "norm" in name else 0.0))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(c2a model loaded from the HF checkpoint on disk, the HF model, config)."""
    cfg = CONFIGS[request.param]
    torch.manual_seed(1)
    hf = hf_llama(cfg)
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(path)
    return load_pretrained(path, dtype=torch.float32).eval(), hf, cfg


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()


def hf_greedy(hf: transformers.LlamaForCausalLM, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("length", [1, 6, 41])
def test_greedy_matches_hf_generate(pair, length):
    model, hf, cfg = pair
    ids = prompt(length, cfg.vocab_size, seed=length)
    ours = generate(model, ids, max_new_tokens=24, stop_ids=())
    ref = hf_greedy(hf, ids, 24, eos=None)
    assert len(ref) == 24
    assert ours == ref
    assert len(set(ref)) > 4  # a real path, not one token repeated


def test_stop_id_ends_generation_as_hf_does(pair):
    model, hf, cfg = pair
    ids = prompt(9, cfg.vocab_size, seed=7)
    free = generate(model, ids, max_new_tokens=20, stop_ids=())
    stop = free[5]
    first = free.index(stop)
    ours = generate(model, ids, max_new_tokens=20, stop_ids=(stop,))
    assert ours == free[: first + 1]  # ends with the stop token, as HF returns it
    assert ours == hf_greedy(hf, ids, 20, eos=stop)
    # any of several stop ids ends it; one that never comes changes nothing
    other = free[8]
    assert (
        generate(model, ids, 20, stop_ids=(cfg.vocab_size - 1 if cfg.vocab_size - 1 not in free else 0, other, stop))
        == free[: min(first, free.index(other)) + 1]
    )


def test_batched_equals_one_by_one(pair):
    """Left-padded prompts of different lengths, rows that stop early while others go on."""
    model, _, cfg = pair
    prompts = [prompt(n, cfg.vocab_size, seed=100 + n) for n in (1, 4, 17, 30, 9)]
    alone = [generate(model, p, 16, stop_ids=()) for p in prompts]
    assert generate_batch(model, prompts, 16, stop_ids=()) == alone
    stop = alone[2][3]  # stops row 2 early (and any other row that meets it)
    alone_stopped = [generate(model, p, 16, stop_ids=(stop,)) for p in prompts]
    assert alone_stopped[2] == alone[2][: alone[2].index(stop) + 1]
    assert generate_batch(model, prompts, 16, stop_ids=(stop,)) == alone_stopped


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(pair):
    model, _, cfg = pair
    ids = prompt(5, cfg.vocab_size, seed=3)
    draw = lambda seed, **kw: generate(model, ids, 16, temperature=1.5, stop_ids=(), seed=seed, **kw)  # noqa: E731
    assert draw(11) == draw(11)
    assert draw(11) != draw(12)
    assert draw(11, top_p=0.9) == draw(11, top_p=0.9)
    greedy = generate(model, ids, 16, stop_ids=())
    assert draw(11) != greedy
    # a nucleus smaller than any token's probability keeps only the most likely token
    assert draw(11, top_p=1e-6) == greedy
    assert draw(12, top_p=1e-6) == greedy
    batch = generate_batch(model, [ids, ids], 16, temperature=1.5, stop_ids=(), seed=11)
    assert batch[0] != batch[1]  # rows draw independently


def two_token_model(p_a: float, a: int, b: int, vocab: int = 16) -> Llama:
    """A model whose next-token distribution is (p_a on `a`, 1 - p_a on `b`, ~0 elsewhere) whatever the
    input: equal embeddings, blocks that add nothing (wo = w2 = 0), and an output head reading one unit."""
    cfg = LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=vocab, ffn_hidden_dim=8)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.fill_(1.0)  # every h is the all-ones vector, RMSNorm keeps it at 1
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        logits = torch.full((vocab,), -30.0)
        logits[a], logits[b] = math.log(p_a), math.log(1 - p_a)
        model.output.weight.zero_()
        model.output.weight[:, 0] = logits  # logits = W @ h = W[:, 0] since h = ones / rms(ones) = ones
    return model


def test_sampled_frequencies_follow_temperature():
    """1,600 seeded draws (32 rows x 50 steps) from p = (0.7, 0.3): the share of token a within 4 standard
    deviations (4 * sqrt(p(1-p)/n) = 0.046) of p at T = 1, of p^(1/T) normalised at T = 2 and 0.5."""
    a, b, p = 5, 9, 0.7
    model = two_token_model(p, a, b)
    prompts = [[1, 3]] * 32
    for T in (1.0, 2.0, 0.5):
        tokens = [t for row in generate_batch(model, prompts, 50, temperature=T, stop_ids=(), seed=0) for t in row]
        assert set(tokens) == {a, b}
        expected = p ** (1 / T) / (p ** (1 / T) + (1 - p) ** (1 / T))
        share = tokens.count(a) / len(tokens)
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(tokens)), (T, share, expected)
    # top_p 0.6 < 0.7: the nucleus is token a alone; top_p 0.8 keeps both
    only_a = generate_batch(model, prompts, 20, temperature=1.0, top_p=0.6, stop_ids=(), seed=0)
    assert {t for row in only_a for t in row} == {a}
    both = generate_batch(model, prompts, 20, temperature=1.0, top_p=0.8, stop_ids=(), seed=0)
    assert {t for row in both for t in row} == {a, b}


def test_sample_function_greedy_and_validation():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 2.9]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [1, 0]
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="temperature|top_p"):
            sample(logits, **{"temperature": 1.0, "top_p": 1.0, "generator": None, **bad})


def test_bad_prompts_are_rejected():
    model = two_token_model(0.5, 3, 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [[1, 2], []], 4)
    assert generate(model, [1], 0) == []
