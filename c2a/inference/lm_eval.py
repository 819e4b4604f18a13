"""c2a's model as an lm-evaluation-harness model, and the model card's benchmark suite.

    pip install -e ".[eval]"      # lm-eval is an optional extra, imported only by this module

Importing this module registers the model with lm-eval (`lm_eval --model c2a`).

`C2ALM` subclasses lm-eval's `TemplateLM`, so the harness itself splits each (context, continuation)
request into tokens exactly as it does for its own `hf` model (trailing spaces of the context moved to the
continuation, the pair encoded whole and cut at the context's length, an empty context replaced by BOS);
c2a supplies the tokenizer (c2a's Tokenizer: Llama-2's SentencePiece model, or a tokenizer.json) and the
scoring:
  - `loglikelihood`: requests sorted by length, longest first, `batch_size` at a time, right-padded (causal
    attention never looks right, so padding changes no real position's logits), one forward per batch;
    log-softmax in fp32 whatever the model's dtype; sum of the continuation's log-probs and whether greedy
    decoding would have produced it. Inputs longer than the model's max_seq_len are cut from the left, as
    lm-eval's hf model cuts them.
  - `loglikelihood_rolling`: a whole text's log-likelihood over disjoint windows of max_seq_len tokens
    (lm-eval's own `get_rolling_token_windows`), scored as loglikelihood requests.
  - `generate_until`: c2a's KV-cache generation (`generate_batch`, greedy unless the task asks for
    temperature > 0), cut at the first stop string; the text decoded as lm-eval's hf model decodes it.
Tested against lm-eval's `hf` model on c2a's HF export of the same weights: the same per-request
log-likelihoods (1e-4) and the same metrics (tests/test_lm_eval.py).

`OPEN_LLM_V1` is the Open LLM Leaderboard v1 settings the claude2-alpaca card's numbers come from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, make_table
except ImportError as e:  # the optional extra is not installed
    raise ImportError(
        'lm-evaluation-harness is not installed: pip install -e ".[eval]" (or pip install lm_eval)'
    ) from e

from c2a.data import Tokenizer
from c2a.inference.loading import load_model_and_tokenizer
from c2a.model import Llama
from c2a.model.decode import generate_batch

log = logging.getLogger(__name__)


@register_model("c2a")
class C2ALM(TemplateLM):
    """lm-eval model over a c2a `Llama` and its tokenizer. From lm-eval's own CLI:
    `lm_eval --model c2a --model_args pretrained=DIR,dtype=bf16 --tasks ...` (after `import c2a.inference.lm_eval`)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tok, self._batch_size, self.max_gen_toks = model.eval(), tokenizer, batch_size, max_gen_toks
        self._device = next(model.parameters()).device
        self.max_length = model.cfg.max_seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> C2ALM:
        """lm-eval's `--model_args pretrained=DIR[,tokenizer=PATH,device=cuda,dtype=bf16,batch_size=N]`."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        model, tok = load_model_and_tokenizer(
            args.pop("pretrained"),
            args.pop("tokenizer", None),
            extra.get("device") or args.pop("device", None),
            args.pop("dtype", "auto"),
        )
        batch = extra.get("batch_size") or args.pop("batch_size", 8)
        return cls(model, tok, batch_size=int(batch), **{k: int(v) for k, v in args.items()})

    # --- tokens ---------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # an empty context is conditioned on BOS, as lm-eval's hf model does for Llama

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS + pieces (Llama's tokenizer default, what lm-eval's hf model gets from it), unless told not to or
        the text already starts with BOS's piece."""
        bos = add_special_tokens is not False and not (
            add_special_tokens is None and string.startswith(self.tok.piece(self.tok.bos_id))
        )
        return self.tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    # --- scoring --------------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # the model sees context + continuation without its last token, cut to max_seq_len from the left
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self._batch_size):
            batch = order[start : start + self._batch_size]
            T = len(inputs[batch[0]])
            ids = torch.full((len(batch), T), self.tok.eos_id, dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, : len(inputs[i])] = torch.tensor(inputs[i])
            logits = self.model(ids.to(self._device))  # [B, T, V]
            for b, i in enumerate(batch):
                cont = requests[i][2]
                end = len(inputs[i])
                # [len(cont), V]: the positions that predict the continuation; fp32 only for them (a [B, T, V]
                # fp32 copy would be 4 GB at 16 x 2048 x 32000)
                lp = F.log_softmax(logits[b, end - len(cont) : end].float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (float(lp.gather(1, target[:, None]).sum()), greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[r] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}  # one generation setting per batch
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
        for members in groups.values():
            kw = dict(args[members[0]][1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if not 0 < max_new < self.max_length:
                raise ValueError(
                    f"generate_until: max_gen_toks {max_new} must be between 1 and the model's max_seq_len {self.max_length} - 1"
                )
            do_sample = kw.pop("do_sample", None)
            temperature = float(kw.pop("temperature", 0.0)) if do_sample is not False else 0.0
            top_p = float(kw.pop("top_p", 1.0))
            kw.pop("max_length", None)
            if kw:
                log.warning(
                    "generate_until: generation settings %s are not supported by c2a's generation and are ignored",
                    sorted(kw),
                )
            members.sort(key=lambda i: -len(args[i][0]))
            for start in range(0, len(members), self._batch_size):
                batch = members[start : start + self._batch_size]
                # room for the new tokens inside max_seq_len: the context is cut from the left
                prompts = [self.tok_encode(args[i][0])[-(self.max_length - max_new) :] for i in batch]
                outs = generate_batch(
                    self.model,
                    prompts,
                    max_new,
                    temperature=temperature,
                    top_p=top_p,
                    stop_ids=(self.tok.eos_id,),
                    vocab_size=self.tok.vocab_size,
                )
                for i, new in zip(batch, outs, strict=True):
                    if new and new[-1] == self.tok.eos_id:
                        new = new[:-1]
                    # decoded alone, as lm-eval's hf model decodes (SentencePiece drops the first piece's space)
                    text = self.tok.decode(new)
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- the card's suite


@dataclass(frozen=True)
class Benchmark:
    column: str  # the card's column
    task: str  # lm-eval's task (or group) name
    num_fewshot: int
    metric: str  # lm-eval's metric key, without its ",none" filter suffix
    hub_dataset: str  # where lm-eval's task reads it from (for the offline error)


# The Open LLM Leaderboard v1 settings (HF's leaderboard "About" page, lm-eval at its 2023 commit):
# ARC-challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc (mean over 57 subjects),
# TruthfulQA 0-shot mc2. The card's row: claude2-alpaca-13b.
OPEN_LLM_V1 = (
    Benchmark("ARC", "arc_challenge", 25, "acc_norm", "allenai/ai2_arc"),
    Benchmark("HellaSwag", "hellaswag", 10, "acc_norm", "Rowan/hellaswag"),
    Benchmark("MMLU", "mmlu", 5, "acc", "cais/mmlu"),
    Benchmark("TruthfulQA", "truthfulqa_mc2", 0, "acc", "truthfulqa/truthful_qa"),
)
CARD_ROW = {
    "model": "claude2-alpaca-13b (card)",
    "ARC": 61.18,
    "HellaSwag": 84.08,
    "MMLU": 55.74,
    "TruthfulQA": 44.18,
    "Average": 61.29,
}
SUITES = {"open-llm-v1": OPEN_LLM_V1}


class BenchmarkDataMissing(ValueError):
    """A benchmark's hub dataset is neither reachable nor cached; the message says how to provide it."""


def _unreachable(e: BaseException) -> bool:
    """Whether an exception (or one it came from) is a hub dataset that could not be fetched: `datasets`
    raises ConnectionError offline ("Couldn't reach 'allenai/ai2_arc' on the Hub") and FileNotFoundError for
    what is not cached."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in (
            "DatasetNotFoundError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def evaluate_tasks(
    lm: C2ALM,
    tasks: list[str],
    num_fewshot: int | None,
    limit: int | None,
    include_path: str | None,
    log_samples: bool = False,
    task_manager: Any = None,
) -> dict[str, Any]:
    """lm-eval's simple_evaluate on c2a's model: its result dict ("results", "configs", "n-shot", ...)."""

    known = task_manager
    if known is None and include_path:
        # lm-eval's own tasks take seconds to index (thousands of YAMLs): skipped when the folder has them all
        known = TaskManager(include_path=include_path, include_defaults=False)
        known = known if all(t in known.all_tasks for t in tasks) else None
    known = known or TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in known.all_tasks]
    if missing:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(missing)}"
            + (
                f" (also looked in {include_path})"
                if include_path
                else "; a local task's YAML goes in a folder passed with --include-path"
            )
        )
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=known, log_samples=log_samples
    )


def suite_scores(b: Benchmark, results: dict[str, Any]) -> float:
    """The card's number (percent) for one benchmark from lm-eval's results."""
    if b.task == "mmlu":
        # the leaderboard's MMLU is the plain mean over the 57 subjects; lm-eval's group weights them by size
        subjects = [t for t in results["configs"] if t.startswith("mmlu_")]
        return 100 * sum(results["results"][t]["acc,none"] for t in subjects) / len(subjects)
    return 100 * results["results"][b.task][f"{b.metric},none"]


def run_suite(
    lm: C2ALM, suite: Sequence[Benchmark], limit: int | None, task_manager: Any = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Every benchmark at its setting: ({column: percent, "Average": ...}, {task: lm-eval's results})."""

    tm = task_manager or TaskManager()
    scores, raw = {}, {}
    for b in suite:
        try:
            raw[b.task] = evaluate_tasks(lm, [b.task], b.num_fewshot, limit, None, task_manager=tm)
        except Exception as e:
            if not _unreachable(e):
                raise
            raise BenchmarkDataMissing(
                f"{b.column}: lm-eval's task {b.task} reads the hub dataset {b.hub_dataset}, which could not be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). With network it is downloaded into the Hugging Face "
                f"cache on first use. Offline: on a machine with network run python -c \"import datasets; datasets.load_dataset('{b.hub_dataset}')\" "
                f"(HF's dataset configs as lm-eval's task names them), copy its cache folder ($HF_HOME, default ~/.cache/huggingface) here and "
                f"set HF_DATASETS_OFFLINE=1; or run the task from local files with --tasks and a task YAML "
                f"(dataset_path: json, data_files) in --include-path"
            ) from None
        scores[b.column] = suite_scores(b, raw[b.task])
    scores["Average"] = sum(scores.values()) / len(suite)
    return scores, raw


def suite_table(
    name: str, scores: dict[str, float], suite: Sequence[Benchmark] = OPEN_LLM_V1, limit: int | None = None
) -> str:
    """The card's table: this model's row and the card's claude2-alpaca-13b row, in the card's layout."""
    columns = [b.column for b in suite] + ["Average"]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row_name, row in ((name, scores), (CARD_ROW["model"], CARD_ROW)):
        lines.append(f"| {row_name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    settings = "; ".join(f"{b.column}: {b.task} {b.num_fewshot}-shot {b.metric}" for b in suite)
    lines.append(f"settings: {settings} (Open LLM Leaderboard v1; MMLU is the mean over its 57 subjects)")
    if limit:
        lines.append(f"--limit {limit}: each task ran on at most {limit} examples: not comparable with the card's row")
    return "\n".join(lines)


def run_lm_eval(
    model_dir: str | Path,
    *,
    tasks: Sequence[str] = (),
    suite: str | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | Path | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """lm-eval's `tasks`, or the card's `suite` (a name of SUITES), on a checkpoint: {"report": the table, ...};
    lm-eval's result JSON (the suite's scores and results) written to `output` when given."""
    model, tok = load_model_and_tokenizer(model_dir, tokenizer, device, dtype)
    lm = C2ALM(model, tok, batch_size=batch_size)
    name = Path(model_dir).resolve().name
    if suite:
        scores, raw = run_suite(lm, SUITES[suite], limit)
        out = {
            "model": str(model_dir),
            "suite": suite,
            "scores": scores,
            "report": suite_table(name, scores, SUITES[suite], limit),
        }
        to_write = {"suite": suite, "scores": scores, "results": {t: r["results"] for t, r in raw.items()}}
    else:
        results = evaluate_tasks(lm, list(tasks), num_fewshot, limit, str(include_path) if include_path else None)
        out = {
            "model": str(model_dir),
            "tasks": list(tasks),
            "results": results["results"],
            "report": make_table(results),
        }
        to_write = results
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(to_write, indent=2, default=handle_non_serializable) + "\n")
        out["report"] += f"\nresults      {output}"
    return out
