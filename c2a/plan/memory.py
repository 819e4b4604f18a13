"""Per-rank memory of one training step, by category, from the model's shapes and the run's settings.

The categories follow what `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` attributes live tensor
storage to, so the planner can be checked against it (tests/test_plan.py does, on CPU):

  params      the rank's fp32 shard of every parameter: 4 N / S bytes (N parameters, S ranks sharing a copy)
  grads       their fp32 gradient shards: 4 N / S (reduce dtype fp32), present from the first reduce-scatter
  optimizer   AdamW's exp_avg and exp_avg_sq, fp32: 8 N / S (+ one 4-byte step per parameter tensor); with
              train.optimizer = "adamw8bit", about 2 N / S: see `adamw8bit_state_bytes`
              (train.master_dtype = "bf16": parameters, gradients and AdamW's moments in bf16, half as many bytes)
  fsdp        unsharded (all-gathered) parameters in the compute dtype: the root's (embedding, final norm,
              output head: kept unsharded from its forward to the end of the backward) and two blocks' (the
              block running and the one prefetched), plus, in a block's backward, its unsharded gradients
              and the fp32 reduce-scatter input
  activations tensors saved for the backward at the end of the forward, the loss head's included
  loss_head   the head's transient in its forward: a chunk of fp32 logits and its gradient (on top of the
              saved part, which `activations` holds)
  peak        the largest sum at any point of the step, from a walk through forward and backward

With LoRA (Workload.lora_rank > 0) the base is frozen: its shards are in the compute dtype (c bytes a
parameter) with no gradient or optimizer state, and no weight-gradient transients (a frozen head computes no
dW); the adapters (r·(in + out) a target linear) have fp32 masters, gradients and AdamW state, and add their
r-wide intermediates (and with dropout, the dropped inputs) to the saved activations. With QLoRA
(Workload.lora_nf4) the target linears' bases are NF4 instead (`nf4_bytes`: 0.5 bytes a weight + 1 per 64,
sharded and gathered as uint8; the second-level scales are unsharded buffers on every rank), and each linear's
forward and backward dequantizes its weight into a transient (`nf4_dequant_bytes`).

The saved activations are counted tensor by tensor from the code (c2a/model/llama.py and the ops of the
backend that runs it, see `block_saved_bytes`), not fitted. train.gather_once keeps every block gathered
until its backward (fsdp grows to the whole model in the compute dtype); train.reduce_once keeps every
gradient unsharded in fp32 until the step's last reduce-scatter (grads grow from 4 N / S to 4 N). With cpu_offload, params, grads and optimizer
state live in host memory (pinned on CUDA) and the device holds only what a step gathers and computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from c2a.config import LlamaConfig, checkpointed_block

# fp32 master weights, fp32 gradients (MixedPrecisionPolicy(reduce_dtype=fp32)), AdamW's two fp32 moments
PARAM_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
# train.optimizer = "adamw8bit" (torchao 0.18's OptimState8bit, c2a/train/adamw8bit.py): moments quantized in
# blocks of 256 values, each moment with its own 256-entry fp32 code map, and only for shards of at least 4,096
# values that split into whole blocks (torchao's rule, after bitsandbytes'); other shards keep fp32 moments
ADAMW8BIT_BLOCK, ADAMW8BIT_MIN_NUMEL, ADAMW8BIT_MAP_BYTES = 256, 4096, 256 * 4
# NF4 (c2a/kernels/nf4.py): 4-bit codes, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
# torch's chunked linear cross-entropy on CPU: rows per chunk so that a chunk's fp32 logits are 64 MiB
# (c2a.kernels.cross_entropy.CHUNK_LOGITS_BYTES; mirrored here to keep the planner free of torch)
TORCH_CHUNK_LOGITS_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Workload:
    """What one rank runs in one micro-batch, and how the model is sharded and checkpointed."""

    model: LlamaConfig
    micro_batch: int  # rows per micro-batch (B)
    seq_len: int  # positions per row (T): data.max_len packed, the longest example of the batch padded
    trained_fraction: float = 0.5  # share of positions with a trained target (the torch head keeps only those)
    packed: bool = True  # several documents per row (the torch path's per-document attention adds a copy)
    ranks: int = 1  # data-parallel ranks (GPUs)
    replicas: int = 1  # HSDP replicas: parameters are sharded over ranks / replicas
    compute_bytes: int = 2  # 2 for bf16, 4 for fp32 (FSDP2's param_dtype: the unsharded weights' dtype)
    backend: str = "triton"  # "triton" (CUDA) or "torch" (the reference ops, what CPU runs)
    cuda: bool = True  # off CUDA the head runs only the trained rows (llama._trained_rows), whatever the backend
    activation_checkpointing: str = "none"  # none | full | selective | first (auto is resolved before: c2a.plan.auto)
    ac_every: int = 2
    ac_blocks: int = 0  # with "first": the blocks checkpointed, from the first
    accumulation: int = 1  # micro-batches per optimizer step on this rank
    cpu_offload: bool = False
    master_bytes: int = PARAM_BYTES  # the stored parameters' dtype (train.master_dtype): their grads and Adam's too
    reduce_bytes: int = 4  # the gradient reduce-scatter's dtype (train.reduce_dtype)
    optimizer: str = "adamw"  # adamw | adamw8bit
    gather_once: bool = False  # train.gather_once: the blocks stay gathered (compute dtype) across the step
    reduce_once: bool = False  # train.reduce_once: unsharded fp32 gradients accumulate across the step
    fp8: bool = False  # train.fp8: the block linears save float8 copies of their inputs and weights
    # LoRA: the base frozen in the compute dtype, rank-r adapters (fp32, AdamW) on these linears (wq ... w3)
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: bool = False
    lora_nf4: bool = False  # lora.quantize = "nf4" (QLoRA): the target linears' base weights held in NF4

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def shard(self) -> int:
        return self.ranks // self.replicas

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def checkpointed(self, layer: int) -> bool:
        return checkpointed_block(self.activation_checkpointing, layer, self.ac_every, self.ac_blocks)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank. `peak` is device memory (with cpu_offload, host memory holds `host`)."""

    params: int
    grads: int
    optimizer: int
    fsdp: int  # at the peak
    activations: int  # saved for the backward at the end of the forward (head included)
    loss_head: int  # the head's transient, at its own peak in the forward
    peak: int
    host: int  # offloaded state (params + grads + optimizer) when cpu_offload, else 0
    peak_combined: int  # device and host together at their joint peak (what a CPU-only run measures)
    peak_phase: str  # where the step peaks: "head forward" or "backward of layer i"

    def as_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


def adamw8bit_state_bytes(numel: int) -> int:
    """AdamW8bit's state for one parameter shard of `numel` values: per moment a uint8 code a value, an fp32
    scale per 256 and its 256-entry fp32 map, i.e. 2 + 8/256 bytes a parameter for the two (plus 2 KiB); fp32
    moments (8 bytes a parameter) where torchao leaves the shard unquantized; and the 4-byte step."""
    if numel >= ADAMW8BIT_MIN_NUMEL and numel % ADAMW8BIT_BLOCK == 0:
        moments = 2 * (numel + 4 * (numel // ADAMW8BIT_BLOCK) + ADAMW8BIT_MAP_BYTES)
    else:
        moments = 8 * numel
    return moments + 4


def nf4_bytes(numel: int) -> int:
    """An NF4 weight of `numel` values (c2a.model.quantized.NF4Linear): 0.5 bytes a weight (whole blocks of 64),
    an 8-bit absmax a block, an fp32 second-level scale per 256 blocks, and the fp32 offset."""
    blocks = -(-numel // NF4_BLOCK)
    return blocks * NF4_BLOCK // 2 + blocks + 4 * -(-blocks // NF4_SCALE_BLOCK) + 4


def parameter_shapes(m: LlamaConfig) -> list[tuple[int, ...]]:
    """Every parameter tensor's shape: each block's (wq, wk, wv, wo, w1, w2, w3, two norms), then the root's
    (embedding, final norm, output head unless tied)."""
    kv = m.n_kv_heads * m.head_dim
    D, F = m.dim, m.ffn_hidden_dim
    block = [(D, D), (kv, D), (kv, D), (D, D), (F, D), (D, F), (F, D), (D,), (D,)]
    root = [(m.vocab_size, D), (D,)] + ([] if m.tie_word_embeddings else [(m.vocab_size, D)])
    return block * m.n_layers + root


def shard_numels(shape: tuple[int, ...], shard: int) -> list[int]:
    """Values of a parameter each of `shard` ranks holds: FSDP2 splits dim 0 in chunks of ceil(rows / S), so
    the last ranks may hold fewer rows, or none."""
    rows, rest = shape[0], 1
    for d in shape[1:]:
        rest *= d
    chunk = -(-rows // shard)
    return [max(0, min(chunk, rows - r * chunk)) * rest for r in range(shard)]


def optimizer_bytes(w: Workload) -> int:
    """The optimizer state of the rank that holds the most: AdamW's or AdamW8bit's, over every parameter (full
    fine-tuning) or the adapters only (LoRA)."""
    per_rank = [0] * w.shard
    for shape in lora_adapter_shapes(w) if w.lora else parameter_shapes(w.model):
        for r, n in enumerate(shard_numels(shape, w.shard)):
            per_rank[r] += adamw8bit_state_bytes(n) if w.optimizer == "adamw8bit" else ADAM_BYTES * n + 4
    return max(per_rank)


def block_params(m: LlamaConfig) -> int:
    kv = m.n_kv_heads * m.head_dim
    return 2 * m.dim * m.dim + 2 * m.dim * kv + 3 * m.dim * m.ffn_hidden_dim + 2 * m.dim


def lora_shapes(m: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear LoRA may adapt."""
    D, F, kd = m.dim, m.ffn_hidden_dim, m.n_kv_heads * m.head_dim
    return {"wq": (D, D), "wk": (D, kd), "wv": (D, kd), "wo": (D, D), "w1": (D, F), "w2": (F, D), "w3": (D, F)}


def lora_adapter_shapes(w: Workload) -> list[tuple[int, int]]:
    """Every adapter tensor's shape: lora_A [r, in] and lora_B [out, r] of each target linear of each block."""
    shapes = lora_shapes(w.model)
    block = [s for t in w.lora_targets for s in ((w.lora_rank, shapes[t][0]), (shapes[t][1], w.lora_rank))]
    return block * w.model.n_layers


def lora_block_params(w: Workload) -> int:
    """A block's adapter parameters: r·(in + out) per target linear."""
    shapes = lora_shapes(w.model)
    return sum(w.lora_rank * sum(shapes[t]) for t in w.lora_targets)


def lora_saved_bytes(w: Workload) -> int:
    """Per token, what a block's adapters add to its saved tensors: each target's r-wide A·x (B's input), and
    with dropout each target's dropped input (in·c, A's input) and its mask (in bytes). The base linear's input
    is saved already (the adapter's A reads the same tensor when there is no dropout)."""
    shapes, c = lora_shapes(w.model), w.compute_bytes
    per = sum(w.lora_rank * c for _ in w.lora_targets)
    if w.lora_dropout:
        per += sum(shapes[t][0] * (c + 1) for t in w.lora_targets)
    return per


def nf4_linears(w: Workload) -> list[int]:
    """QLoRA: the values of each NF4 base of a block (its target linears), [] without nf4."""
    shapes = lora_shapes(w.model)
    return [shapes[t][0] * shapes[t][1] for t in w.lora_targets] if w.lora_nf4 else []


def nf4_shard_bytes(w: Workload) -> tuple[int, int, int]:
    """QLoRA, one block: (the rank's shard of its NF4 codes and absmaxes, FSDP2 splitting [blocks, 32] and
    [blocks] by whole blocks; the same gathered; the unsharded second-level scale buffers)."""
    shard = gathered = buffers = 0
    for n in nf4_linears(w):
        blocks = -(-n // NF4_BLOCK)
        shard += _padded(blocks, w.shard) * (NF4_BLOCK // 2 + 1)
        gathered += blocks * (NF4_BLOCK // 2 + 1)
        buffers += nf4_bytes(n) - blocks * (NF4_BLOCK // 2 + 1)
    return shard, gathered, buffers


def nf4_dequant_bytes(w: Workload) -> int:
    """QLoRA: the largest base's dequantization transient, alive while its linear multiplies by it: the
    weight in the compute dtype (Triton); the torch reference's fp32 lookups [n] and their product with the
    absmaxes (8 bytes a weight), then the compute-dtype copy when below fp32."""
    n = max(nf4_linears(w), default=0)
    if w.backend == "triton":
        return n * w.compute_bytes
    return n * (8 + (w.compute_bytes if w.compute_bytes != 4 else 0))


def root_params(m: LlamaConfig) -> int:
    return head_matrices(m) * m.vocab_size * m.dim + m.dim  # embedding, output head (unless tied), final norm


def head_matrices(m: LlamaConfig) -> int:
    """[V, D] parameters: the embedding and the output head, or one shared matrix when tied."""
    return 1 if m.tie_word_embeddings else 2


def _padded(n: int, shard: int) -> int:
    """FSDP2 pads each parameter's dim 0 to a multiple of the shard count: a shard holds ceil(n / S)."""
    return -(-n // shard)


def block_saved_bytes(w: Workload) -> int:
    """Bytes one block saves for its backward per token, the block's input included, without checkpointing.

    D model dim, Kd = K·Hd (keys, values), F FFN width, H heads, c the compute dtype's bytes.
    triton (the autograd.Functions' save_for_backward in c2a/kernels):
      x, normed, rotated q, attention out o (also wo's input), h, ffn-normed: 6·D·c; rotated k, v: 2·Kd·c;
      a, b (swiglu) and its output (w2's input): 3·F·c; two rstd and the attention's lse: 4·(2 + H).
    torch (the reference ops; autograd saves the inputs each op needs):
      x, both RMSNorms' fp32 x·rstd (4·D each), normed, q, o, h, ffn-normed; k, v; a, b, silu(a) and its
      product with b: 4·F·c; rotary's fp32 cos and sin (Hd/2 each); two rstd, lse. Below fp32, each RMSNorm
      also keeps x.float() (4·D). Packed rows run attention per document and concatenate: one more D·c copy.
    """
    m, c = w.model, w.compute_bytes
    D, F, H, kd = m.dim, m.ffn_hidden_dim, m.n_heads, m.n_kv_heads * m.head_dim
    if w.fp8:
        # c2a.kernels.fp8_linear saves each linear's input as float8 (1 byte), quantized per linear: the
        # attention-normed input three times (wq, wk, wv) instead of once in c, the FFN-normed twice (w1, w3),
        # o once more (wo's; the attention keeps its own), the SwiGLU output once (w2's) instead of in c
        fp8_inputs = 3 * D + 2 * D + D + F
        if w.backend == "triton":
            return 4 * D * c + 2 * kd * c + 2 * F * c + fp8_inputs + 4 * (2 + H)
        return block_saved_bytes(dataclasses.replace(w, fp8=False)) - 2 * D * c - F * c + fp8_inputs
    if w.backend == "triton":
        return 6 * D * c + 2 * kd * c + 3 * F * c + 4 * (2 + H)
    # the norms' x·rstd is what their weight gradient reads: a frozen norm (LoRA) saves none
    per = (6 * D * c + (0 if w.lora else 2 * 4 * D)) + 2 * kd * c + 4 * F * c + 4 * m.head_dim + 4 * (2 + H)
    if c != 4:
        per += 2 * 4 * D
    if w.packed:
        per += D * c
    return per


def head_rows(w: Workload) -> int:
    """Rows the loss head runs: every position on CUDA; on CPU only the trained ones (llama._trained_rows)."""
    return w.tokens if w.cuda else max(1, round(w.tokens * w.trained_fraction))


def head_saved_bytes(w: Workload) -> int:
    """What the loss head keeps from its forward to its backward: the fp32 dW [V, D] both paths compute in
    the forward, and per row: triton the final RMSNorm's input and rstd, and dh (2·D·c + 4); torch the final
    RMSNorm's input, x·rstd (fp32), the normed rows, rstd and the label (int64). Off CUDA the rows are the
    trained ones, gathered into a copy (the norm's input); on CUDA the last block's output is the input."""
    m, c, rows = w.model, w.compute_bytes, head_rows(w)
    dw = 0 if w.lora else 4 * m.vocab_size * m.dim  # a frozen head (LoRA) gets no dW
    if w.backend == "triton":
        return dw + rows * (2 * m.dim * c + 4)
    return dw + rows * (2 * m.dim * c + (0 if w.lora else 4 * m.dim) + 4 + 8)  # frozen norm: no x·rstd


def head_transient_bytes(w: Workload) -> int:
    """The head's forward transient: one chunk of fp32 logits [C, V] and the gradient written in its place
    (a second [C, V] in h's dtype below fp32)."""
    m, c, rows = w.model, w.compute_bytes, head_rows(w)
    if w.backend == "triton":  # c2a.kernels.cross_entropy._chunk_rows
        chunk = max(1, rows * m.dim // m.vocab_size)
        chunk = min(rows, max(256, min(1 << (chunk.bit_length() - 1), 8192)))
        return chunk * m.vocab_size * (4 + (c if c != 4 else 0))
    chunk = max(1, min(rows, TORCH_CHUNK_LOGITS_BYTES // (4 * m.vocab_size)))
    # logits and their softmax gradient, fp32; a frozen head (LoRA): the logits only (FSDPMemTracker's peak on
    # 2 gloo ranks leaves room for no more, tests/test_plan.py)
    return (1 if w.lora else 2) * chunk * m.vocab_size * 4


def backward_temp_bytes(w: Workload) -> int:
    """Per token, the gradients alive inside a block's backward at its largest: the incoming gradient of
    the residual stream and the one being built, and two F-wide gradients in the FFN (of the SwiGLU
    product and of one of its inputs): 2·(D + F)·c."""
    m = w.model
    return 2 * (m.dim + m.ffn_hidden_dim) * w.compute_bytes


def root_backward_bytes(w: Workload) -> int:
    """The end of the backward, beyond the blocks' gradient shards: the root unit's [V, D] matrices (k = 2,
    or 1 tied) in two moments, the larger counted.
      embedding backward: the root still gathered (k·VD·c), the head's and the embedding's gradients (2·VD·c,
        summed afterwards when tied) and one more fp32 [V, D] (the head's dW or the embedding backward's
        scratch: present with both kernel paths);
      root post-backward: k unsharded gradients (k·VD·c), the reduce-scatter's fp32 input (k·VD·4) and output
        (k·VD·4 / S), and the same extra fp32 [V, D].
    On CPU in fp32 that is 7, 6 (2+ ranks) and 4 (tied, any ranks) fp32 [V, D]: what FSDPMemTracker measured
    on gloo, torch 2.13, with either kernel path (tests/test_plan.py)."""
    m, S, c = w.model, w.shard, w.compute_bytes
    vd, k = m.vocab_size * m.dim, head_matrices(m)
    embedding_backward = k * vd * c + 2 * vd * c + 4 * vd
    r = w.reduce_bytes
    post_backward = k * vd * c + k * vd * r + k * r * _padded(vd, S) + 4 * vd
    return max(embedding_backward, post_backward)


def _state_bytes(w: Workload, n_shard: int, n_lora: int) -> tuple[int, int, int, int]:
    """A rank's parameter, gradient and optimizer-state bytes, and the parameters a block has gradients for."""
    m, S, c = w.model, w.shard, w.compute_bytes
    scale = w.master_bytes / PARAM_BYTES  # the stored dtype: fp32, or bf16 pure (train.master_dtype)
    if w.lora:  # the base's shards in the compute dtype; the adapters' fp32 masters, gradients and AdamW state
        n_trained = m.n_layers * _padded(n_lora, S)
        base = c * n_shard
        if w.lora_nf4:  # QLoRA: the target linears' shards in NF4 instead
            base = c * (m.n_layers * _padded(block_params(m) - sum(nf4_linears(w)), S) + _padded(root_params(m), S))
            base += m.n_layers * nf4_shard_bytes(w)[0]
        params, grads = base + PARAM_BYTES * n_trained, GRAD_BYTES * n_trained
        if w.optimizer == "adamw8bit":
            opt = optimizer_bytes(w)
        else:  # + AdamW's step counters
            opt = ADAM_BYTES * n_trained + 4 * 2 * len(w.lora_targets) * m.n_layers
        n_block_grads = n_lora
    else:  # the shards, their gradients and AdamW's two moments, all in the stored dtype
        params, grads = int(PARAM_BYTES * scale) * n_shard, int(GRAD_BYTES * scale) * n_shard
        if w.optimizer == "adamw8bit":
            opt = optimizer_bytes(w)
        else:  # + AdamW's step counter, one fp32 scalar per parameter tensor
            opt = int(ADAM_BYTES * scale) * n_shard + 4 * (9 * m.n_layers + 1 + head_matrices(m))
        n_block_grads = block_params(m)
    return params, grads, opt, n_block_grads


def plan_memory(w: Workload) -> MemoryPlan:
    """Per-rank bytes of one optimizer step of `w`, its last micro-batch (the one with the most state
    alive): the static state, then a walk over the points where memory can peak (the head's forward, each
    block's backward from the last, the root's post-backward), keeping the largest."""
    m, S, c = w.model, w.shard, w.compute_bytes
    n_block, n_root, n_lora = block_params(m), root_params(m), lora_block_params(w)
    n_shard = m.n_layers * _padded(n_block, S) + _padded(n_root, S)
    params, grads, opt, n_block_grads = _state_bytes(w, n_shard, n_lora)
    scale = w.master_bytes / PARAM_BYTES
    block_grad_shard = int(GRAD_BYTES * scale) * _padded(n_block_grads, S)
    # state that lives on the device, or on the host with cpu_offload; gradient shards appear as blocks
    # finish their backward (all of them from the start with accumulation: earlier micro-batches made them)
    static = params + opt + (grads if w.accumulation > 1 else 0)
    if w.reduce_once and w.accumulation > 1 and S > 1:
        # the earlier micro-batches' gradients wait unsharded, in fp32, for the last one's reduce-scatter
        # (instead of as shards): every parameter's, on every rank
        static += GRAD_BYTES * (m.n_layers * n_block + n_root) - grads

    root, block = n_root * c, (n_block + n_lora) * c
    if w.lora_nf4:  # a gathered block: its NF4 bases as codes and absmaxes, the rest in the compute dtype
        _, nf4_gathered, nf4_buffers = nf4_shard_bytes(w)
        block = (n_block - sum(nf4_linears(w)) + n_lora) * c + nf4_gathered
        static += m.n_layers * nf4_buffers
    gathered = 2 if S > 1 else 1  # the block running, and (sharded) the next one prefetched
    T = w.tokens
    per_block = (block_saved_bytes(w) + (lora_saved_bytes(w) if w.lora else 0)) * T
    saved_input = m.dim * c * T  # what a checkpointed block keeps: its input
    saved = [saved_input if w.checkpointed(i) else per_block for i in range(m.n_layers)]
    if w.lora and w.backend == "torch" and not w.checkpointed(0):
        saved[0] -= m.dim * c * T  # a frozen embedding's output needs no gradient: the first block keeps no input
    head_saved = head_saved_bytes(w)
    head_rows_saved = head_saved - (0 if w.lora else 4 * m.vocab_size * m.dim)
    activations = sum(saved) + head_saved

    # (device bytes, host bytes, fsdp bytes) at each point of the step where memory can peak
    phases: dict[str, tuple[int, int, int]] = {}
    if w.lora and S > 1:
        # the forward's first all-gathers: the root's and the first block's unsharded parameters with their
        # all-gather buffers still alive (FSDPMemTracker, 2 gloo ranks); with LoRA's small state and
        # activations this can be the step's peak
        phases["first all-gathers"] = (2 * (root + block), static, 2 * (root + block))
    # forward: the head runs last, with every block's saved tensors alive and the blocks resharded
    # (train.gather_once: every block stays gathered from its forward to its backward, or in a group of one
    # the compute-dtype copy of the whole model stays allocated)
    every_block = m.n_layers * block if w.gather_once else 0
    phases["head forward"] = (root + every_block + activations + head_transient_bytes(w), static, root + every_block)
    # backward, last layer first. The head's dW is now the output weight's unsharded gradient (fp32 on the
    # torch path, in the compute dtype on CUDA), kept until the root's reduce-scatter at the end.
    head_grad = (0 if w.lora else m.vocab_size * m.dim * (4 if w.backend == "torch" else c)) + head_rows_saved
    alive = sum(saved)
    for i in reversed(range(m.n_layers)):
        recompute = per_block - saved_input if w.checkpointed(i) else 0
        done = (m.n_layers - 1 - i) * block_grad_shard if w.accumulation == 1 else 0
        # gather_once: the blocks not yet through this micro-batch's backward are still gathered (in a group
        # of one the compute copies of every block stay allocated)
        fsdp = root + ((i + 1 if S > 1 else m.n_layers) * block if w.gather_once else gathered * block)
        inside = alive + recompute + backward_temp_bytes(w) * T + nf4_dequant_bytes(w)
        # after the block's compute: its activations freed, its unsharded grads and the fp32 reduce-scatter input
        after = alive - saved[i] + n_block_grads * c + (w.reduce_bytes * n_block_grads if S > 1 else 0)
        phases[f"backward of layer {i}"] = (fsdp + head_grad + max(inside, after), static + done, fsdp)
        alive -= saved[i]
    phases["root backward"] = (
        root if w.lora else root_backward_bytes(w),  # a frozen root (LoRA) has no backward of its own
        static + m.n_layers * block_grad_shard * (w.accumulation == 1),
        0,
    )

    if w.cpu_offload:
        host = params + grads + opt
        phase = max(phases, key=lambda k: phases[k][0])
        device, _, fsdp = phases[phase]
        peak, combined = device, max(dev + h for dev, h, _ in phases.values())
    else:
        host = 0
        phase = max(phases, key=lambda k: phases[k][0] + phases[k][1])
        device, held, fsdp = phases[phase]
        peak = combined = device + held
    return MemoryPlan(params, grads, opt, fsdp, activations, head_transient_bytes(w), peak, host, combined, phase)
