"""How two training configs differ, and what each difference changes: `python -m c2a.train.compare A B`.

A reproduction that misses a published result usually differs from the run it reproduces in settings that
look harmless. `config_diff` lists every key whose resolved value differs (defaults included, so a key one
file leaves out still counts), and says what it changes: first the settings that change the trained model,
then those that change only speed, memory or what is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from c2a.config import TrainConfig, config_keys

# What a difference in the key changes, where the key's help text alone does not say it.
EFFECTS: dict[str, str] = {
    "train.loss_weighting": "how targets weigh in the loss: per token (long answers weigh more) or per example "
    "(each example's mean, then the mean over the step's examples)",
    "train.lr_schedule": "the cosine: c2a's (step 1 at lr/warmup, ending at the last step) or transformers' "
    "(step 1 at lr 0, ending one step later, rising again past its horizon)",
    "train.warmup_rounding": "the warmup's length: warmup_ratio x steps rounded up, or down as int() does",
    "train.schedule_steps": "the cosine's horizon: the run's own steps, or a fixed count (a run longer than it "
    "goes past the end of the cosine)",
    "train.master_dtype": "the stored weights and AdamW state: fp32 master weights, or bf16 only (updates below "
    "bf16's resolution, about 1/256 of a weight, are lost)",
    "train.reduce_dtype": "the precision of the gradient sum across ranks",
    "train.lr": "the peak learning rate",
    "train.epochs": "passes over the data: the number of steps and the schedule's length",
    "train.global_batch": "examples per optimizer step: the number of steps and the gradient noise",
    "train.dtype": "the precision of forward and backward",
    "train.seed": "the initial weights (from scratch) and the data order",
    "data.template": "the prompt every example is trained with (and that generation must use)",
    "data.tokenization": "the tokens of each example at the prompt/response boundary, and which are masked",
    "data.truncation": "what a long example loses: the prompt's middle (EOS kept), its tail with the EOS, or "
    "the whole example",
    "data.max_len": "which examples are cut or dropped, and the length of packed rows",
    "data.packing": "rows of packed examples or one padded example per row: which examples share a step",
    "data.path": "the training data",
    "data.tokenizer": "the tokens",
    "model.checkpoint": "the starting weights",
    "model.preset": "the model's shape (when training from scratch)",
    "model.add_pad_token": "the vocabulary (32000 -> 32001): one more mean-initialised row, whose logit enters "
    "every softmax; the exported model's shape",
}

# Keys that change how a run goes, not what it trains (speed, memory, records, evaluation), up to rounding.
NOT_THE_MODEL = (
    "out_dir",
    "train.micro_batch",
    "train.micro_batch_auto",
    "train.activation_checkpointing",
    "train.ac_every",
    "train.ac_blocks",
    "train.compile",
    "train.deterministic",
    "train.replicas",
    "train.cpu_offload",
    "train.save_every",
    "train.save_every_minutes",
    "train.keep_last",
    "train.keep_best",
    "train.log_every",
    "train.max_bad_steps",
    "train.tensorboard",
    "train.progress",
    "data.workers",
    "data.skip_bad_rows",
    "eval.",
)


@dataclass(frozen=True)
class Difference:
    key: str
    a: Any
    b: Any
    effect: str
    changes_model: bool


def _value(cfg: TrainConfig, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_diff(a: TrainConfig, b: TrainConfig) -> list[Difference]:
    """Every key whose resolved value differs, those that change the trained model first (in key order)."""
    diffs = []
    for key, field in config_keys().items():
        va, vb = _value(a, key), _value(b, key)
        if va != vb:
            effect = EFFECTS.get(key) or field.metadata.get("help", "")
            changes = not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NOT_THE_MODEL)
            diffs.append(Difference(key, va, vb, effect, changes))
    return sorted(diffs, key=lambda d: not d.changes_model)


def format_diff(diffs: list[Difference], name_a: str, name_b: str) -> str:
    """The differences as text: `key  a -> b` and, indented, what it changes."""
    if not diffs:
        return f"{name_a} and {name_b} train the same way: no setting differs"
    model = [d for d in diffs if d.changes_model]
    width = max(len(d.key) for d in diffs)
    lines = [f"A: {name_a}", f"B: {name_b}", ""]
    for title, group in (
        (f"{len(model)} setting(s) change the trained model:", model),
        (f"{len(diffs) - len(model)} setting(s) change only speed, memory or records:", diffs[len(model) :]),
    ):
        if group:
            lines.append(title)
            for d in group:
                lines += [f"  {d.key:<{width}}  {d.a!r} -> {d.b!r}", f"  {'':<{width}}  {d.effect}"]
            lines.append("")
    return "\n".join(lines).rstrip("\n")
