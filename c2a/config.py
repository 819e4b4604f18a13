"""Typed configuration: model presets (Meta's params.json names), the training config, the one dtype table.

Dataclasses and tables only: no torch logic beyond naming dtypes.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import torch

# The dtype names every CLI and config key takes (train.dtype, --dtype, convert --dtype).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A name of DTYPES, or "auto": bf16 on CUDA, fp32 elsewhere (CPUs have no fast bf16 matmuls)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def compute_dtype(train: TrainSection, device: torch.device | str) -> torch.dtype:
    """The dtype forward and backward run in: train.dtype resolved, or bf16 when the parameters themselves
    are bf16 (train.master_dtype = "bf16": nothing to cast them to)."""
    return torch.bfloat16 if train.master_dtype == "bf16" else resolve_dtype(train.dtype, device)


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama model's hyper-parameters under the field names of Meta's params.json.

    `n_kv_heads=None` means multi-head attention (n_kv_heads = n_heads). `ffn_hidden_dim=None` derives
    the feed-forward width with Meta's formula from `dim`, `ffn_dim_multiplier` and `multiple_of`; an
    int is taken as given (HF's `intermediate_size`). Both are resolved in `__post_init__`, so a
    constructed config always holds concrete numbers.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    ffn_hidden_dim: int | None = None
    # Tied head (TinyLlama-style small models, SmolLM, Llama-3.2 1B/3B): the output head IS the embedding
    # matrix, one [V, D] parameter. HF config.json's `tie_word_embeddings`.
    tie_word_embeddings: bool = False
    # Llama-3.1's rope scaling, under the names of Meta's params.json (llama-models' ModelArgs:
    # use_scaled_rope, rope_scaling_factor, high_freq_factor; its low_freq_factor 1 and old_context_len 8192
    # are constants there, fields here as in HF's rope_scaling). Off: plain rope (Llama-2).
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    # Special-token ids written to an exported config.json (transformers' generate stops at its
    # eos_token_id). Defaults: Llama-2's, also what transformers' LlamaConfig assumes when config.json has
    # no such key. Read from an HF config.json (Llama-3: 128000 and 128001, or several EOS ids such as
    # Llama-3.1-Instruct's [128001, 128008, 128009]); Meta's params.json names none. None: the config.json
    # said null. Several EOS ids may be given as a list; they are kept as a tuple so the config stays
    # hashable, and written back as a list.
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden_dim is None:
            object.__setattr__(
                self, "ffn_hidden_dim", meta_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            )
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "ffn_hidden_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif (self.dim // self.n_heads) % 2:
                problems.append(f"head dim dim/n_heads = {self.dim // self.n_heads} must be even for rotary pairs")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
            if self.use_scaled_rope and not (
                self.rope_scaling_factor >= 1
                and 0 < self.low_freq_factor < self.high_freq_factor
                and self.original_max_seq_len > 0
            ):
                problems.append(
                    "llama3 rope scaling needs rope_scaling_factor >= 1, 0 < low_freq_factor < high_freq_factor and "
                    f"original_max_seq_len > 0, got {self.rope_scaling_factor}, {self.low_freq_factor}, "
                    f"{self.high_freq_factor}, {self.original_max_seq_len}"
                )
        bos, eos = self.bos_token_id, self.eos_token_id
        if not (bos is None or _is_token_id(bos)):
            problems.append(f"bos_token_id must be a non-negative integer or None, got {bos!r}")
        if not (eos is None or _is_token_id(eos) or (isinstance(eos, tuple) and all(map(_is_token_id, eos)))):
            problems.append(f"eos_token_id must be a non-negative integer, a list of them or None, got {eos!r}")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_params(self) -> int:
        """Parameter count: embedding + output head (unless tied) + blocks + final norm."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * (self.n_heads * hd) * 2 + self.dim * (kv * hd) * 2
        ffn = 3 * self.dim * self.ffn_hidden_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + head + self.n_layers * (attn + ffn + 2 * self.dim) + self.dim

    @classmethod
    def from_name(cls, name: str) -> LlamaConfig:
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: 2/3 of 4·dim, scaled, rounded up to a multiple (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, LlamaConfig] = {
    # Meta's params.json for the three Llama-2 sizes (FFN 11008 / 13824 / 28672 by the formula).
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": LlamaConfig(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    # The bundled demo task's model: small enough to fine-tune on 2 CPU cores in minutes. Its vocabulary
    # is the demo SentencePiece tokenizer's (c2a/data/assets/demo_tokenizer.model).
    "demo": LlamaConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=512, multiple_of=64, max_seq_len=512),
}


# ------------------------------------------------------------------------------------ training config
#
# The defaults below ARE the embedded demo run (`torchrun -m c2a.train` with no --config); configs/demo.toml
# spells the same values out. The claude2-alpaca recipes (configs/claude2-alpaca-*.toml) override them.


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelSection:
    preset: str = _f("demo", "LlamaConfig preset when no checkpoint is given: " + ", ".join(PRESETS))
    checkpoint: str = _f("", "pretrained HF or Meta checkpoint directory to fine-tune ('' = train from scratch)")
    base_model: str = _f(
        "", "the base's hub id for final/README.md ('' = the checkpoint config.json's _name_or_path when it is one)"
    )
    add_pad_token: bool = _f(
        False,
        "add one vocabulary row (a pad token, as the released claude2-alpaca model: 32000 -> 32001), its embedding and head rows the mean of the others; exported so",
    )


@dataclass(frozen=True)
class MixSource:
    """One `[[data.mix]]` table: a training source and how many passes over it an epoch makes."""

    path: str
    weight: float = 1.0  # passes per epoch: 1.0 = every example once, 0.5 = a seeded half, 2.0 = twice
    template: str = ""  # chat template of this source's chat records ('' = data.template)


MIX_KEYS = ("path", "weight", "template")


@dataclass(frozen=True)
class DataSection:
    path: str = _f(
        "demo", "'demo' (the bundled task), a .json/.jsonl/.parquet file, a prepared cache dir, or a hub dataset name"
    )
    tokenizer: str = _f(
        "",
        "SentencePiece tokenizer.model or HF tokenizer.json ('' = the demo tokenizer for 'demo', else <model.checkpoint>/tokenizer.model, or its tokenizer.json when it has no tokenizer.model)",
    )
    max_len: int = _f(256, "maximum tokens per example and packed row length")
    packing: bool = _f(
        True,
        "pack whole examples into rows of max_len (false: pad each micro-batch to its longest, as Stanford Alpaca)",
    )
    skip_bad_rows: bool = _f(False, "skip malformed records with a counted warning instead of stopping")
    template: str = _f(
        "auto",
        "chat template for records with messages: auto (the tokenizer's chat_template, else alpaca), tokenizer, alpaca, llama2-chat or alpaca-claude2-released; Alpaca records use Alpaca's prompt, chosen by the instruction (not the input) with alpaca-claude2-released as the released model was",
    )
    tokenization: str = _f(
        "split",
        "Alpaca records: split (prompt and response encoded apart, no piece across the boundary) or joint (prompt+response in one piece, the prompt's token count masked, as the released claude2-alpaca model)",
    )
    truncation: str = _f(
        "truncate",
        "examples longer than max_len: truncate (the prompt's middle first, then the response's tail; EOS kept), drop them, or right (keep the first max_len+1 tokens, EOS lost, as HF's truncation=True); counted either way",
    )
    workers: int = _f(0, "processes for tokenizing a data file (0 = one per CPU core)")
    demo_train_size: int = _f(38500, "examples generated for the demo task's training split")
    demo_heldout_size: int = _f(500, "examples generated for the demo task's held-out split")
    val_path: str = _f(
        "", "validation set: a .json/.jsonl/.parquet file, a prepared cache dir, or a hub dataset name ('' = none)"
    )
    val_fraction: float = _f(
        0.0,
        "hold out this share of the training examples for validation (seeded by train.seed, never trained on; 0 = none)",
    )
    # [[data.mix]] tables (TOML only, not a --key): several sources with weights instead of data.path
    mix: tuple[MixSource, ...] = dataclasses.field(default=(), metadata={"toml_only": True})

    @property
    def is_demo(self) -> bool:
        """The bundled demo task is the training data (data.path 'demo', no [[data.mix]])."""
        return self.path == "demo" and not self.mix


AC_MODES = ("none", "full", "selective", "first", "auto")


def checkpointed_block(mode: str, layer: int, ac_every: int, ac_blocks: int) -> bool:
    """Whether train.activation_checkpointing = `mode` recomputes block `layer` (0-based) in the backward;
    "auto" is resolved to "first" before a model is built (c2a.plan.auto)."""
    if mode == "auto":
        raise ValueError("train.activation_checkpointing = auto must be resolved first (c2a.plan.auto)")
    return mode == "full" or (mode == "selective" and layer % ac_every == 0) or (mode == "first" and layer < ac_blocks)


@dataclass(frozen=True)
class TrainSection:
    epochs: int = _f(3, "passes over the training data")
    max_steps: int = _f(
        0, "stop after this many optimizer steps (0 = epochs decide); the schedule spans the steps actually run"
    )
    global_batch: int = _f(
        64, "sequences per optimizer step (padded: examples; packed: the equivalent number of packed rows)"
    )
    micro_batch: int = _f(
        3,
        "sequences per forward/backward on one rank; accumulation = global_batch / (micro_batch * ranks); auto = 1 with micro_batch_auto = true",
    )
    micro_batch_auto: bool = _f(
        False,
        "on CUDA, the largest micro-batch the planner says fits among those that split the step's rows (as train.micro_batch gives them) evenly over the ranks: the same rows, steps and schedule, only fewer, larger forwards; train.micro_batch elsewhere; a resumed run keeps the value its checkpoint recorded",
    )
    lr: float = _f(1e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr (cosine decay)")
    warmup_ratio: float = _f(0.03, "fraction of the optimizer steps spent in linear warmup")
    warmup_rounding: str = _f("ceil", "warmup steps = warmup_ratio x steps rounded: ceil (HF Trainer) or floor (int())")
    lr_schedule: str = _f(
        "c2a",
        "c2a (warmup from 1/warmup, cosine ending at the last step) or hf (transformers' get_cosine_schedule_with_warmup: step 0 at lr 0, no clamp past its horizon)",
    )
    schedule_steps: int = _f(0, "the schedule's horizon in optimizer steps (0 = the run's own step count)")
    loss_weighting: str = _f(
        "token",
        "token (the step's mean over trained targets) or example (each example's mean over its targets, then the mean over the step's examples)",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (norm weights never decay)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2 (the claude2-alpaca recipes keep HF Trainer's 0.999)")
    eps: float = _f(1e-8, "AdamW epsilon")
    optimizer: str = _f(
        "adamw",
        "adamw (fp32 moments, 8 bytes a parameter) or adamw8bit (8-bit block-wise moments, about 2; needs the adamw8bit extra: torchao)",
    )
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    dtype: str = _f(
        "auto",
        "compute dtype: bf16, fp32, or auto (bf16 on CUDA, fp32 on CPU); master weights stay fp32 unless train.master_dtype",
    )
    master_dtype: str = _f(
        "fp32",
        "parameters and AdamW state: fp32 (master weights), or bf16 (pure bf16, no fp32 copy, as the released claude2-alpaca model; compute in bf16)",
    )
    reduce_dtype: str = _f("fp32", "dtype of the gradient reduce-scatter across ranks: fp32 or bf16")
    activation_checkpointing: str = _f(
        "none",
        "none | full | selective (every ac_every-th block) | first (the first ac_blocks blocks) | auto (on CUDA, the fewest first blocks the planner says make the run fit; none elsewhere)",
    )
    ac_every: int = _f(2, "with selective checkpointing, checkpoint every k-th block")
    ac_blocks: int = _f(0, "with activation_checkpointing = first, checkpoint this many blocks, from the first")
    compile: bool = _f(False, "torch.compile each transformer block")
    fp8: bool = _f(
        False,
        "the blocks' linears (attention's wq, wk, wv, wo; the FFN's w1, w2, w3) compute in float8: e4m3 forward, e5m2 gradients, dynamic tensorwise scales; the head, attention, norms stay in the compute dtype, and weights stay fp32 masters (CUDA: compute capability 8.9+)",
    )
    gather_once: bool = _f(
        False,
        "all-gather (and cast to the compute dtype) the parameters once per optimizer step, keeping them unsharded across its micro-batches' forwards and backwards (memory: the whole model in the compute dtype on every rank)",
    )
    reduce_once: bool = _f(
        False,
        "accumulate the micro-batches' gradients unsharded in fp32 and reduce-scatter once per optimizer step (memory: an fp32 gradient of the whole model on every rank)",
    )
    deterministic: bool = _f(
        False,
        "bitwise-reproducible steps on GPU: torch.use_deterministic_algorithms(True), so the attention backward computes dQ in its own pass instead of with fp32 atomics (about 7/5 of its matmul work)",
    )
    replicas: int = _f(
        1,
        "HSDP: replicate groups (ranks / replicas shard each copy); 1 = plain FSDP. As many as ranks, with gather_once: every rank holds a whole fp32 copy without FSDP (no all-gathers, no FSDP copies) and the gradients are all-reduced once per step; `python -m c2a.plan` says whether it fits",
    )
    cpu_offload: bool = _f(
        False,
        "keep parameters, gradients and AdamW state in host memory (FSDP2 CPUOffloadPolicy, pinned on CUDA); the GPU holds only what a step gathers and computes. `python -m c2a.plan` says when it is needed",
    )
    seed: int = _f(0, "seed for weight init and data order")
    save_every: int = _f(0, "checkpoint every this many optimizer steps (0 = only at the end)")
    save_every_minutes: float = _f(
        0.0,
        "also checkpoint when this many minutes passed since the last save (0 = off), so a crash loses at most that",
    )
    keep_last: int = _f(2, "complete checkpoints to keep")
    keep_best: bool = _f(
        False, "also keep the checkpoint with the lowest validation loss (needs data.val_path or data.val_fraction)"
    )
    early_stop_patience: int = _f(
        0,
        "stop when the validation loss has not improved for this many validations, and export the best checkpoint (0 = off; needs eval.every, turns on keep_best)",
    )
    log_every: int = _f(50, "optimizer steps between metrics.jsonl records")
    max_bad_steps: int = _f(3, "stop (with a checkpoint) after this many non-finite steps in a row")
    tensorboard: bool = _f(False, "also log to TensorBoard in out_dir/tensorboard (needs the tensorboard package)")
    wandb: bool = _f(
        False, "also log to Weights & Biases (the wandb extra; WANDB_PROJECT, WANDB_MODE=offline, WANDB_DIR)"
    )
    mlflow: bool = _f(
        False, "also log to MLflow (the mlflow extra; MLFLOW_TRACKING_URI, unset: sqlite:///<out_dir>/mlflow.db)"
    )
    run_name: str = _f("", "the run's name in W&B and MLflow ('' = out_dir's name)")
    progress: bool = _f(True, "show a progress bar on rank 0")


@dataclass(frozen=True)
class EvalSection:
    demo_accuracy: bool = _f(True, "with data.path = 'demo': held-out exact-match accuracy before and after training")
    max_examples: int = _f(500, "held-out examples to evaluate")
    max_new_tokens: int = _f(48, "generation limit per held-out answer")
    every: int = _f(0, "validation loss every this many optimizer steps (0 = only at the end)")
    plot: bool = _f(
        False, "draw out_dir/metrics.png (losses, validation loss, lr) at the end of the run (needs matplotlib)"
    )


# PEFT's module names of a Llama (what PEFT users write in target_modules) -> c2a's (Meta's) names.
LORA_TARGETS: dict[str, str] = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
}


@dataclass(frozen=True)
class LoraSection:
    rank: int = _f(0, "LoRA rank r (0 = full fine-tuning: every weight trains)")
    alpha: float = _f(0.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora); 0 = 2 x rank")
    dropout: float = _f(0.0, "dropout on the LoRA branch's input (PEFT's lora_dropout)")
    targets: str = _f(
        "all-linear",
        "comma-separated linears that get adapters: PEFT's names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), Meta's (wq,wk,wv,wo,w1,w2,w3), or all-linear for all seven",
    )
    rslora: bool = _f(False, "rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)")
    init_adapter: str = _f(
        "",
        "a PEFT LoRA adapter directory to continue training ('' = new adapters); its r, alpha, targets and rslora win",
    )
    quantize: str = _f(
        "none",
        "the frozen base's block linears: none (compute dtype) or nf4 (QLoRA: 4-bit NF4, blocks of 64, double quant)",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or bool(self.init_adapter)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha else 2.0 * self.rank

    @property
    def scale(self) -> float:
        return self.lora_alpha / (self.rank**0.5 if self.rslora else self.rank)

    def target_modules(self) -> tuple[str, ...]:
        """The targets in c2a's names (wq ... w3), in Meta's order; ValueError naming an unknown one."""
        return lora_target_modules(self.targets)


def lora_target_modules(targets: str) -> tuple[str, ...]:
    names = [t.strip() for t in targets.split(",") if t.strip()]
    meta = set()
    for name in names:
        if name == "all-linear":
            meta |= set(LORA_TARGETS.values())
        elif name in LORA_TARGETS:
            meta.add(LORA_TARGETS[name])
        elif name in LORA_TARGETS.values():
            meta.add(name)
        else:
            raise ValueError(
                f"lora.targets: unknown target {name!r}; valid: all-linear, {', '.join(LORA_TARGETS)}, "
                f"{', '.join(LORA_TARGETS.values())}"
            )
    if not meta:
        raise ValueError("lora.targets is empty; e.g. all-linear or q_proj,v_proj")
    return tuple(sorted(meta))


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = _f("out/demo", "run directory: config.toml, metrics.jsonl, checkpoints/, final/")
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)

    def __post_init__(self) -> None:
        t = self.train
        checks = {
            "train.activation_checkpointing must be none, full, selective, first or auto": t.activation_checkpointing
            in AC_MODES,
            "train.ac_blocks must be >= 0": t.ac_blocks >= 0,
            "train.dtype must be auto, bf16 or fp32": t.dtype in ("auto", "bf16", "fp32"),
            "train.optimizer must be adamw or adamw8bit": t.optimizer in ("adamw", "adamw8bit"),
            "train.optimizer = adamw8bit keeps fp32 master weights: train.master_dtype must be fp32": t.optimizer
            == "adamw"
            or t.master_dtype == "fp32",
            "train.master_dtype and train.reduce_dtype must be fp32 or bf16": t.master_dtype in ("fp32", "bf16")
            and t.reduce_dtype in ("fp32", "bf16"),
            "train.master_dtype = bf16 computes in bf16: train.dtype must be auto or bf16": t.master_dtype == "fp32"
            or t.dtype != "fp32",
            "data.truncation must be truncate, drop or right": self.data.truncation in ("truncate", "drop", "right"),
            "data.tokenization must be split or joint": self.data.tokenization in ("split", "joint"),
            "train.global_batch, train.micro_batch, train.epochs, data.max_len must be positive": min(
                t.global_batch, t.micro_batch, t.epochs, self.data.max_len
            )
            > 0,
            "train.warmup_ratio must be in [0, 1)": 0 <= t.warmup_ratio < 1,
            "train.warmup_rounding must be ceil or floor": t.warmup_rounding in ("ceil", "floor"),
            "train.lr_schedule must be c2a or hf": t.lr_schedule in ("c2a", "hf"),
            "train.lr_schedule = hf has no final lr floor: train.min_lr_ratio must be 0": t.lr_schedule != "hf"
            or t.min_lr_ratio == 0,
            "train.schedule_steps must be >= 0": t.schedule_steps >= 0,
            "train.loss_weighting must be token or example": t.loss_weighting in ("token", "example"),
            "train.ac_every, train.replicas, train.keep_last, train.log_every, train.max_bad_steps must be >= 1": min(
                t.ac_every, t.replicas, t.keep_last, t.log_every, t.max_bad_steps
            )
            >= 1,
            "train.max_steps, train.save_every, train.save_every_minutes must be >= 0": min(
                t.max_steps, t.save_every, t.save_every_minutes
            )
            >= 0,
            "train.lr and train.eps must be positive": t.lr > 0 and t.eps > 0,
            "train.grad_clip and train.weight_decay must be >= 0 (grad_clip 0 = off)": min(t.grad_clip, t.weight_decay)
            >= 0,
            "train.min_lr_ratio must be in [0, 1]": 0 <= t.min_lr_ratio <= 1,
            "train.beta1 and train.beta2 must be in [0, 1)": 0 <= t.beta1 < 1 and 0 <= t.beta2 < 1,
            "data.demo_train_size and data.demo_heldout_size must be positive": min(
                self.data.demo_train_size, self.data.demo_heldout_size
            )
            > 0,
            "data.workers must be >= 0": self.data.workers >= 0,
            "data.val_fraction must be in [0, 1)": 0 <= self.data.val_fraction < 1,
            "data.val_path and data.val_fraction are two ways to choose a validation set: set one": not (
                self.data.val_path and self.data.val_fraction
            ),
            "[[data.mix]] and data.path are two ways to choose the training data: set one": not (
                self.data.mix and self.data.path != "demo"
            ),
            "[[data.mix]] needs a path and a weight > 0 in every table": all(
                m.path and m.weight > 0 for m in self.data.mix
            ),
            "eval.every must be >= 0": self.eval.every >= 0,
            "eval.every needs a validation set (data.val_path or data.val_fraction)": not self.eval.every
            or bool(self.data.val_path or self.data.val_fraction),
            "train.keep_best needs a validation set (data.val_path or data.val_fraction)": not t.keep_best
            or bool(self.data.val_path or self.data.val_fraction),
        }
        checks["train.early_stop_patience must be >= 0 and needs eval.every (validations during the run)"] = (
            t.early_stop_patience == 0 or (t.early_stop_patience > 0 and self.eval.every > 0)
        )
        bad = [msg for msg, ok in checks.items() if not ok] + _lora_problems(self)
        if bad:
            raise ValueError("invalid config: " + "; ".join(bad))
        if t.early_stop_patience and not t.keep_best:  # early stopping exports the best checkpoint: keep it
            object.__setattr__(self, "train", dataclasses.replace(t, keep_best=True))


def _lora_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with [lora] alone or with the settings it meets; [] when nothing is."""
    lo, t = cfg.lora, cfg.train
    problems = []
    if lo.rank < 0:
        problems.append(f"lora.rank must be >= 0 (0 = full fine-tuning), got {lo.rank}")
    if lo.alpha < 0:
        problems.append(f"lora.alpha must be >= 0 (0 = 2 x rank), got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {lo.dropout}")
    try:
        lo.target_modules()
    except ValueError as e:
        problems.append(str(e))
    if lo.quantize not in ("none", "nf4"):
        problems.append(f"lora.quantize must be none or nf4, got {lo.quantize!r}")
    if not lo.enabled:
        if lo.quantize == "nf4":
            problems.append(
                "lora.quantize = nf4 freezes a 4-bit base around adapters: it needs lora.rank > 0 (or lora.init_adapter); "
                "lora.rank = 0 is full fine-tuning, which trains every weight"
            )
        return problems
    # what LoRA does not (yet) run with: refused here, before any model is loaded
    if t.compile:
        problems.append("lora with train.compile is not supported (untested); set train.compile = false")
    # settings that landed beside LoRA and are not yet tested with it: refused rather than trusted
    untested = {
        "train.fp8 = true": t.fp8,
        "train.gather_once = true": t.gather_once,
        "train.reduce_once = true": t.reduce_once,
        "train.master_dtype = bf16 (the adapters keep fp32 masters)": t.master_dtype != "fp32",
        "model.add_pad_token = true (the new rows would have to train)": cfg.model.add_pad_token,
        "train.early_stop_patience": t.early_stop_patience > 0,
    }
    problems += [f"lora with {what} is not supported yet" for what, on in untested.items() if on]
    # what QLoRA's NF4 base is not tested with (README "One GPU" lists them)
    nf4_untested = {
        "train.cpu_offload = true": t.cpu_offload,
        "train.replicas > 1 (HSDP)": t.replicas > 1,
    }
    if lo.quantize == "nf4":
        problems += [f"lora.quantize = nf4 with {what} is not supported yet" for what, on in nf4_untested.items() if on]
    return problems


def config_keys(cfg_type: type = TrainConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every settable key, dotted ("train.lr"), with its dataclass field."""
    keys = {}
    for f in dataclasses.fields(cfg_type):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys.update(config_keys(f.default_factory, f"{prefix}{f.name}."))
        elif not f.metadata.get("toml_only"):
            keys[prefix + f.name] = f
    return keys


# HF Trainer / Stanford Alpaca argument names that users of the recipe's original script type: c2a's key
_HF_NAMES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch",
    "max_grad_norm": "train.grad_clip",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "model_max_length": "data.max_len",
    "output_dir": "out_dir",
    "model_name_or_path": "model.checkpoint",
    "data_path": "data.path",
    "save_steps": "train.save_every",
    "logging_steps": "train.log_every",
}


def _unknown_key(what: str, key: str, keys: dict[str, dataclasses.Field]) -> KeyError:
    known = _HF_NAMES.get(key.rsplit(".", 1)[-1])
    # else the closest keys of the same section first (a typo rarely changes the section), then of any
    section = key.split(".")[0] + "."
    close = (
        [known]
        if known
        else difflib.get_close_matches(key, [k for k in keys if k.startswith(section)], n=2, cutoff=0.6)
    )
    close = close or difflib.get_close_matches(key, keys, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "`python -m c2a.train --help` lists every key"
    return KeyError(f"{what}; {hint}")


def _coerce(key: str, f: dataclasses.Field, value: Any, from_text: bool) -> Any:
    want = {"str": str, "int": int, "float": float, "bool": bool}[
        f.type if isinstance(f.type, str) else f.type.__name__
    ]
    if from_text:
        if want is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config key {key} expects true or false, got {value!r}")
            return value.lower() in ("true", "1")
        try:
            return want(value)
        except ValueError:
            raise ValueError(f"config key {key} expects {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise ValueError(f"config key {key} expects {want.__name__}, got {type(value).__name__} {value!r}")
    return value


# train.micro_batch = "auto" is short for micro_batch_auto = true on the finest step: rows sized as micro-batch 1
# gives them (every whole number of rows a step, so the most micro-batch sizes to choose from), and micro-batch
# 1 where there is nothing to plan for (CPU)
MICRO_BATCH_AUTO = {"train.micro_batch": 1, "train.micro_batch_auto": True}


def build_config(
    values: dict[str, Any], overrides: dict[str, str] | None = None, source: str = "config"
) -> TrainConfig:
    """TrainConfig from a nested dict (as TOML gives) plus dotted text overrides; unknown keys are errors."""
    keys = config_keys()
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if prefix + k == "data.mix":
                flat["data.mix"] = _mix_tables(v, source)
                continue
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
                continue
            key = prefix + k
            if key not in keys:
                raise _unknown_key(f"{source}: unknown key {key!r}", key, keys)
            if key == "train.micro_batch" and v == "auto":
                flat.update(MICRO_BATCH_AUTO)
                continue
            try:
                flat[key] = _coerce(key, keys[key], v, from_text=False)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None

    walk(values, "")
    for key, text in (overrides or {}).items():
        if key not in keys:
            raise _unknown_key(f"unknown option --{key}", key, keys)
        if key == "train.micro_batch" and text == "auto":
            flat.update(MICRO_BATCH_AUTO)
            continue
        flat[key] = _coerce(key, keys[key], text, from_text=True)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, v in flat.items():
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = v
        else:
            top[key] = v
    section_types = {
        f.name: f.default_factory
        for f in dataclasses.fields(TrainConfig)
        if f.default_factory is not dataclasses.MISSING
    }
    return TrainConfig(**top, **{sec: section_types[sec](**vals) for sec, vals in sections.items()})


def _mix_tables(tables: Any, source: str) -> tuple[MixSource, ...]:
    """`[[data.mix]]` tables as MixSource; a table with an unknown key or a value of the wrong type is an error."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{source}: data.mix must be [[data.mix]] tables (path = ..., weight = ...)")
    mix = []
    for n, table in enumerate(tables, 1):
        unknown = sorted(set(table) - set(MIX_KEYS))
        if unknown:
            raise KeyError(
                f"{source}: [[data.mix]] table {n}: unknown key {unknown[0]!r}; valid: {', '.join(MIX_KEYS)}"
            )
        weight = table.get("weight", 1.0)
        if not isinstance(table.get("path"), str) or not isinstance(table.get("template", ""), str):
            raise ValueError(f"{source}: [[data.mix]] table {n}: path and template must be strings")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{source}: [[data.mix]] table {n}: weight must be a number, got {weight!r}")
        mix.append(MixSource(table["path"], float(weight), table.get("template", "")))
    return tuple(mix)


def config_to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (every key, so a run directory documents itself)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [f"out_dir = {fmt(cfg.out_dir)}"]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            fields = [g for g in dataclasses.fields(section) if not g.metadata.get("toml_only")]
            lines += ["", f"[{f.name}]"] + [f"{g.name} = {fmt(getattr(section, g.name))}" for g in fields]
            for m in getattr(section, "mix", ()):  # [[data.mix]] tables after [data]'s keys
                lines += ["", "[[data.mix]]", f"path = {fmt(m.path)}", f"weight = {m.weight!r}"]
                lines += [f"template = {fmt(m.template)}"] if m.template else []
    return "\n".join(lines) + "\n"
