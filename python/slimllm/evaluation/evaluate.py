"""Measurements of a (pruned) causal LM: perplexity, zero-shot accuracy (lm-eval) and speed.

Everything here takes an already loaded ``(model, tokenizer)`` pair (see
:func:`slimllm.io.checkpoint.load_model`); ``python -m slimllm eval`` is the command-line layer.

Perplexity (the protocol of the paper's code, LLM-Pruner's ``PPLMetric``): the evaluation text
is tokenized once, cut into non-overlapping windows of ``seq_len`` tokens (the tail that does not
fill a window is dropped), every window is scored on its own (no context carried over), and
``ppl = exp(mean NLL)`` over all predicted tokens, i.e. ``seq_len - 1`` tokens per window.
Named texts: ``wikitext2`` (WikiText-2 raw test; rows joined with ``"\\n\\n"`` as the Hugging
Face loader's rows are), ``ptb`` (Penn Treebank test, Mikolov split; stripped sentences joined
with ``"\\n\\n"``) and ``ptb_valid`` (the validation split, which the paper's code actually
scores as "ptb"); each read from the data folder when its file is there, else from the hub.

Zero-shot: lm-eval's own evaluator on an in-memory ``HFLM`` with the task configs shipped in
:mod:`slimllm.evaluation.tasks` (lm-eval's prompts and metrics, local documents).

Speed: prefill and greedy decode throughput with a KV cache, peak memory, medians of repeats.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from slimllm.errors import ConfigError
from slimllm.evaluation.tasks import LOCAL_TASKS, TASKS_DIR, missing_task_files, resolve_data_dir
from slimllm.io.lazy import return_freed_memory

__all__ = [
    "DEFAULT_SEQ_LEN",
    "PPL_DATASETS",
    "PAPER_TASKS",
    "PerplexityResult",
    "SpeedTimings",
    "SpeedResult",
    "resolve_data_dir",
    "load_ppl_text",
    "tokenize_windows",
    "window_nll",
    "perplexity",
    "evaluate_perplexity",
    "check_tasks",
    "zero_shot",
    "median_timings",
    "measure_speed",
    "compare_speed",
    "format_report",
]

#: The paper's perplexity window (tokens).
DEFAULT_SEQ_LEN = 128

#: The seven zero-shot tasks of the paper's tables (lm-eval names).
PAPER_TASKS: tuple[str, ...] = LOCAL_TASKS


@dataclass(frozen=True)
class _PplSource:
    local: str  # path relative to the data folder
    hub: tuple[str, str | None, str, str]  # (dataset path, config, split, text column)
    strip_rows: bool  # HF rows are stripped lines (PTB) or lines with their "\n" (WikiText)


#: Named perplexity texts: local file in the data folder, else the hub dataset.
PPL_DATASETS: dict[str, _PplSource] = {
    "wikitext2": _PplSource(
        "wikitext2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", "text"), False
    ),
    "ptb": _PplSource(
        "ptb/ptb.test.txt",
        ("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence"),
        True,
    ),
    "ptb_valid": _PplSource(
        "ptb/ptb.valid.txt",
        ("ptb-text-only/ptb_text_only", "penn_treebank", "validation", "sentence"),
        True,
    ),
}


# ---------------------------------------------------------------------------------- texts


def _join_rows(rows: Iterable[str]) -> str:
    return "\n\n".join(rows)


def _local_rows(path: Path, strip_rows: bool) -> list[str]:
    """The rows a Hugging Face loader makes of a text file: WikiText keeps each line with its
    newline (blank lines become ""), PTB strips every line."""
    with path.open(encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if strip_rows:
        return [line.strip() for line in lines]
    return [line if line.strip() else "" for line in lines]


def _hub_text(dataset: str, config: str | None, split: str, column: str | None) -> str:
    try:
        import datasets

        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # offline, unknown dataset, ...
        raise ConfigError(
            f"could not load hub dataset {dataset!r} (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {err}"
        ) from err
    if column is None:
        text_cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
        if "text" in ds.column_names:
            column = "text"
        elif len(text_cols) == 1:
            column = text_cols[0]
        else:
            raise ConfigError(
                f"hub dataset {dataset!r} has no 'text' column and several string columns "
                f"{text_cols}; cannot tell which to score"
            )
    return _join_rows(ds[column])


def load_ppl_text(
    name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> tuple[str, str]:
    """The evaluation text for ``name_or_path`` and a description of where it came from.

    ``name_or_path`` is one of :data:`PPL_DATASETS` (``wikitext2``, ``ptb``, ``ptb_valid``:
    the local file under ``data_dir`` when present, else the hub dataset; rows joined with
    ``"\\n\\n"``), a hub dataset id ``owner/name[:config[:split]]`` (split ``test`` by default;
    the ``text`` column, rows joined with ``"\\n\\n"``), or a path to a local file: ``.jsonl``
    files give the ``"\\n\\n"``-join of their records' ``text`` fields, anything else is read
    verbatim (UTF-8).

    Returns ``(text, source)``. Raises :class:`ConfigError` for a missing file, an unknown
    name, an unreachable hub dataset or an empty text.
    """
    spec = os.fspath(name_or_path)
    path = Path(spec).expanduser()
    if spec in PPL_DATASETS:
        src = PPL_DATASETS[spec]
        local = resolve_data_dir(data_dir) / src.local
        if local.is_file():
            text, source = _join_rows(_local_rows(local, src.strip_rows)), str(local)
        else:
            dataset, config, split, column = src.hub
            try:
                text = _hub_text(dataset, config, split, column)
            except ConfigError as err:
                raise ConfigError(
                    f"perplexity text {spec!r}: local file {local} not found (set --data-dir or "
                    f"$SLIMLLM_DATA_DIR) and the hub fallback failed: {err}"
                ) from err
            source = f"hf:{dataset}/{config}/{split}"
    elif path.is_file():
        source = str(path)
        try:
            if path.suffix == ".jsonl":
                import json

                rows = []
                with path.open(encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if line.strip():
                            record = json.loads(line)
                            if not isinstance(record, dict) or "text" not in record:
                                raise ConfigError(f"{path}:{lineno}: record has no 'text' field")
                            rows.append(str(record["text"]))
                text = _join_rows(rows)
            else:
                text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"cannot read perplexity file {path}: {err}") from err
    elif "/" in spec and not spec.startswith((".", "/", "~")) and not path.suffix:
        parts = spec.split(":")
        dataset = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "test"
        text, source = _hub_text(dataset, config, split, None), f"hf:{dataset}/{config}/{split}"
    else:
        raise ConfigError(
            f"perplexity text {spec!r} is neither a file nor a known dataset "
            f"({', '.join(PPL_DATASETS)}) nor a hub id owner/name[:config[:split]]"
        )
    if not text.strip():
        raise ConfigError(f"perplexity text {spec!r} ({source}) is empty")
    return text, source


# ----------------------------------------------------------------------------- perplexity


def tokenize_windows(
    tokenizer, text: str, seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = None
) -> torch.Tensor:
    """Tokenize ``text`` once (the tokenizer's default special tokens, e.g. a leading BOS where
    the tokenizer adds one) and cut it into non-overlapping windows.

    Returns a ``LongTensor`` of shape ``(n_windows, seq_len)``: window ``i`` holds tokens
    ``i*seq_len .. (i+1)*seq_len - 1``; ``n_windows = min(n_tokens // seq_len, max_windows)``.
    Raises :class:`ConfigError` if ``seq_len < 2``, ``max_windows < 1`` or the text is shorter
    than one window.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be positive, got {max_windows}")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len).to(torch.long)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.no_grad()
def window_nll(
    model, windows: torch.Tensor, batch_size: int = 1, progress: bool | str = False
) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) of each window, scored independently.

    ``windows``: ``(n_windows, seq_len)`` token ids. Returns a float64 CPU tensor of shape
    ``(n_windows, seq_len - 1)``: entry ``[i, t]`` is ``-log p(windows[i, t+1] |
    windows[i, :t+1])``; logits are upcast to float32 before the log-softmax. ``progress``:
    a tqdm bar on stderr (a string is its label). Raises :class:`ConfigError` for
    ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    from tqdm.auto import tqdm

    device = _model_device(model)
    out = []
    starts = range(0, windows.shape[0], batch_size)
    label = progress if isinstance(progress, str) else "perplexity"
    for start in tqdm(starts, desc=label, unit="batch", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        out.append(nll.reshape(batch.shape[0], -1).double().cpu())
        del logits
    return torch.cat(out, dim=0)


@dataclass
class PerplexityResult:
    """Perplexity of one text. ``ppl = exp(nll)``; ``nll`` is the mean NLL in nats over the
    ``tokens = windows * (seq_len - 1)`` predicted tokens; ``seconds`` is wall time."""

    dataset: str
    source: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int = 1,
    dataset: str = "text",
    source: str = "",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text``: non-overlapping windows of ``seq_len`` tokens (the
    first ``max_windows`` of them), ``exp`` of the mean token NLL over all predicted tokens.
    ``batch_size`` windows go through the model at a time (on the model's device);
    ``progress`` shows a bar on stderr. Errors as :func:`tokenize_windows`."""
    t0 = time.perf_counter()
    windows = tokenize_windows(tokenizer, text, seq_len, max_windows)
    nll = window_nll(model, windows, batch_size, progress=dataset if progress else False)
    mean = float(nll.mean())
    return PerplexityResult(
        dataset=dataset,
        source=source,
        ppl=math.exp(mean),
        nll=mean,
        tokens=int(nll.numel()),
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
    )


def evaluate_perplexity(
    model,
    tokenizer,
    name_or_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """:func:`load_ppl_text` then :func:`perplexity`; ``dataset`` in the result is the name or
    path as given. Raises :class:`ConfigError` as those do."""
    text, source = load_ppl_text(name_or_path, data_dir)
    return perplexity(
        model,
        tokenizer,
        text,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        dataset=os.fspath(name_or_path),
        source=source,
        progress=progress,
    )


# ------------------------------------------------------------------------------ zero-shot


class _DropNoise(logging.Filter):
    """Hide lm-eval's hints that do not apply here: per-task ones about the local configs, and
    the notice that an in-memory model is used single-process (as it always is here)."""

    _NOISE = (
        "Custom kwargs can be passed",
        "is not of type `str`",
        "is defined, but",
        "Passed an already-initialized model",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self._NOISE)


@contextlib.contextmanager
def _quiet_lm_eval():
    flt = _DropNoise()
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm_eval.api.task", "lm_eval.models.huggingface")]
    for lg in loggers:
        lg.addFilter(flt)
    handlers = [h for lg in loggers for h in lg.handlers]
    for h in handlers:
        h.addFilter(flt)
    try:
        import datasets

        progress = datasets.utils.logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - datasets missing is reported elsewhere
        progress = None
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)
        for h in handlers:
            h.removeFilter(flt)
        if progress:
            import datasets

            datasets.enable_progress_bars()


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(
            "zero-shot evaluation needs lm-eval: pip install 'lm-eval>=0.4.8,<0.5' "
            f"(the 'eval' extra of slimllm); import failed: {err}"
        ) from err
    return TaskManager


def _task_manager(task_source: str, data_dir: str | os.PathLike | None):
    TaskManager = _import_lm_eval()
    if task_source == "local":
        return TaskManager(
            include_path=str(TASKS_DIR),
            include_defaults=False,
            metadata={"data_dir": str(resolve_data_dir(data_dir))},
        )
    if task_source == "hub":
        return TaskManager()
    raise ConfigError(f"task_source must be 'local' or 'hub', got {task_source!r}")


def check_tasks(
    tasks: Sequence[str], *, task_source: str = "local", data_dir: str | os.PathLike | None = None
) -> list[str]:
    """Validate zero-shot task names before any model work and return them as a list
    (``"all"`` expands to :data:`PAPER_TASKS`; duplicates dropped, order kept).

    ``task_source="local"``: each name must be one of :data:`PAPER_TASKS` and its files must be
    in the data folder. ``"hub"``: each name must be a task lm-eval knows (its data comes from
    the hub at run time). Raises :class:`ConfigError` naming the bad task or missing file.
    """
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for t in tasks:
        t = t.strip()
        for n in PAPER_TASKS if t == "all" else (t,):
            if n and n not in names:
                names.append(n)
    if not names:
        raise ConfigError("no zero-shot task given")
    if task_source == "local":
        unknown = [n for n in names if n not in PAPER_TASKS]
        if unknown:
            raise ConfigError(
                f"unknown task(s) {', '.join(unknown)}: the local tasks are "
                f"{', '.join(PAPER_TASKS)} (other lm-eval tasks: --task-source hub, online)"
            )
        for n in names:
            missing = missing_task_files(n, data_dir)
            if missing:
                raise ConfigError(
                    f"task {n}: evaluation data file {missing[0]} not found (set --data-dir or "
                    "$SLIMLLM_DATA_DIR)"
                )
    elif task_source == "hub":
        tm = _task_manager("hub", None)
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            raise ConfigError(f"lm-eval knows no task named {', '.join(unknown)}")
    else:
        raise ConfigError(f"task_source must be 'local' or 'hub', got {task_source!r}")
    return names


def _metric(values: dict[str, Any], name: str) -> float | None:
    v = values.get(f"{name},none")
    if v is None or v == "N/A":
        return None
    return float(v)


def zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    data_dir: str | os.PathLike | None = None,
    task_source: str = "local",
    max_length: int | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy through lm-eval's ``simple_evaluate`` on an in-memory
    ``HFLM(pretrained=model, tokenizer=tokenizer)``.

    ``tasks``: lm-eval task names (see :func:`check_tasks`; local configs from
    :mod:`slimllm.evaluation.tasks` reading ``data_dir`` by default). ``limit``: the first N documents of
    each task. ``max_length``: lm-eval's context limit (default: the model's).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
    "samples"}}, "average_acc", "average_acc_norm", "limit", "task_source", "lm_eval_version",
    "seconds"}``. Accuracies are fractions in [0, 1]; ``acc_norm`` is ``None`` for tasks whose
    lm-eval definition has no such metric (BoolQ, WinoGrande). ``average_acc`` is the mean
    of ``acc``; ``average_acc_norm`` the mean of ``acc_norm`` where a task defines it and
    ``acc`` otherwise. Raises :class:`ConfigError` for bad tasks/limit or missing data.
    """
    names = check_tasks(tasks, task_source=task_source, data_dir=data_dir)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be positive, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    with _quiet_lm_eval():
        tm = _task_manager(task_source, data_dir)
        # lm-eval sets a pad token on the tokenizer it is given: hand it a copy.
        # backend: every model slimllm loads is a causal LM; without it lm-eval guesses from
        # the config and warns about the per-layer pruned model type
        lm = HFLM(
            pretrained=model,
            backend="causal",
            tokenizer=copy.deepcopy(tokenizer),
            batch_size=batch_size,
            max_length=max_length,
        )
        out = simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=tm,
            limit=limit,
            log_samples=False,
        )
    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        values = out["results"][name]
        n = out.get("n-samples", {}).get(name, {})
        per_task[name] = {
            "acc": _metric(values, "acc"),
            "acc_stderr": _metric(values, "acc_stderr"),
            "acc_norm": _metric(values, "acc_norm"),
            "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
            "samples": int(n.get("effective", 0)) or None,
        }
    accs = [r["acc"] for r in per_task.values() if r["acc"] is not None]
    norms = [
        r["acc_norm"] if r["acc_norm"] is not None else r["acc"]
        for r in per_task.values()
        if (r["acc_norm"] if r["acc_norm"] is not None else r["acc"]) is not None
    ]
    return {
        "tasks": per_task,
        "average_acc": statistics.fmean(accs) if accs else None,
        "average_acc_norm": statistics.fmean(norms) if norms else None,
        "limit": limit,
        "task_source": task_source,
        "data_dir": str(resolve_data_dir(data_dir)) if task_source == "local" else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------- speed


@dataclass(kw_only=True)
class SpeedTimings:
    """Prefill and greedy-decode timings of one model: medians over ``repeats`` timed runs
    after ``warmup`` untimed ones (the fields that :class:`SpeedResult` and
    :class:`slimllm.evaluation.llamacpp.LlamaCppSpeed` share; built by
    :func:`median_timings`).

    ``prefill_tokens_per_s`` / ``decode_tokens_per_s``: tokens (batch x ``prompt_len``,
    batch x ``new_tokens``) over the median ``prefill_seconds`` / ``decode_seconds``;
    ``prefill_all_s`` / ``decode_all_s``: the ``repeats`` timings in run order, seconds."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_seconds: float
    decode_seconds: float
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int
    prefill_all_s: list[float] = field(default_factory=list)
    decode_all_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def median_timings(
    runs: Sequence[Callable[[], tuple[float, float]]],
    *,
    prompt_len: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Time several models fairly and take medians: every callable of ``runs`` (one per model,
    returning ``(prefill_seconds, decode_seconds)`` of one run) is first called ``warmup``
    times untimed, all models' warm-ups before any timing, then ``repeats`` timed rounds
    alternate between the models (so load on a shared machine hits them alike).

    Returns, per callable in order, the keyword arguments of :class:`SpeedTimings` (tokens/s
    from ``batch_size * prompt_len`` and ``batch_size * new_tokens`` over the medians). The
    sizes are not checked here: callers raise :class:`ConfigError` for ``repeats < 1`` first."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(repeats):
        for ts, run in zip(times, runs):
            ts.append(run())
    out = []
    for ts in times:
        pre = statistics.median(t[0] for t in ts)
        dec = statistics.median(t[1] for t in ts)
        out.append(dict(
            prefill_tokens_per_s=batch_size * prompt_len / pre,
            decode_tokens_per_s=batch_size * new_tokens / dec,
            prefill_seconds=pre, decode_seconds=dec, prompt_len=prompt_len, new_tokens=new_tokens,
            warmup=warmup, repeats=repeats,
            prefill_all_s=[t[0] for t in ts], decode_all_s=[t[1] for t in ts]))
    return out


@dataclass(kw_only=True)
class SpeedResult(SpeedTimings):
    """Inference speed of one model in transformers (timings as :class:`SpeedTimings`).

    ``prefill_tokens_per_s``: ``batch * prompt_len`` / time of one forward over the prompt
    that fills the KV cache (logits of the last position only, as ``generate`` does). ``decode_tokens_per_s``: ``batch * new_tokens`` / time of
    ``new_tokens`` greedy one-token steps on that cache. ``peak_memory_bytes``: on CUDA the
    largest ``torch.cuda.max_memory_allocated`` during a run (weights included); on CPU the
    peak resident set size during a run minus the RSS before it, freed heap returned to the
    OS first (activations and KV cache; weights excluded, see ``memory_kind``).
    ``weight_bytes``: parameters + buffers. Times in seconds. On a CPU shared with other
    processes, fewer torch threads (``torch.set_num_threads``) give steadier decode timings."""

    peak_memory_bytes: int | None
    memory_kind: str
    weight_bytes: int
    parameters: int
    batch_size: int
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _SpeedRunner:
    def __init__(self, model, prompt_len: int, new_tokens: int, batch_size: int, seed: int):
        self.model = model
        self.device = _model_device(model)
        vocab = int(model.get_input_embeddings().weight.shape[0])
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(self.device)
        self.new_tokens = new_tokens
        # transformers >= 5.2x names the KV cache argument and output `cache`; earlier 5.x
        # releases `past_key_values`.
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - exotic callables
            params = {}
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # like generate(): the prefill computes the logits of the last position only
        self.prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _cache(self, out):
        cache = getattr(out, self.cache_arg, None)
        return cache if cache is not None else getattr(out, "past_key_values", None)

    @torch.no_grad()
    def run(self) -> tuple[float, float]:
        model, device = self.model, self.device
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=self.prompt, use_cache=True, **self.prefill_kwargs)
        _sync(device)
        t1 = time.perf_counter()
        cache = self._cache(out)
        token = out.logits[:, -1:, :].argmax(-1)
        del out
        _sync(device)
        t2 = time.perf_counter()
        for _ in range(self.new_tokens):
            out = model(input_ids=token, use_cache=True, **{self.cache_arg: cache})
            cache = self._cache(out)
            token = out.logits[:, -1:, :].argmax(-1)
        _sync(device)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    def peak_memory(self) -> tuple[int | None, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.run()
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        # freed heap back to the OS first: the RSS before the run is the live memory only and
        # the run's allocations show up as RSS growth again
        gc.collect()
        return_freed_memory()
        before = _rss_bytes()
        if before is not None and _reset_peak_rss():
            self.run()
            peak = _peak_rss_bytes()
            if peak is not None:
                return max(0, peak - before), "cpu_peak_rss_delta"
        return None, "unavailable"


def _weights(model) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(params), int(nbytes)


def _check_speed_args(prompt_len: int, new_tokens: int, batch_size: int, warmup: int, repeats: int):
    if prompt_len < 1 or new_tokens < 1 or batch_size < 1:
        raise ConfigError(
            f"speed: prompt_len, new_tokens and batch_size must be positive "
            f"(got {prompt_len}, {new_tokens}, {batch_size})"
        )
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"speed: warmup >= 0 and repeats >= 1 required (got {warmup}, {repeats})")


def compare_speed(
    models: Sequence[Any],
    *,
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> list[SpeedResult]:
    """:func:`measure_speed` for several models in one run, fairly: every model gets the same
    random prompt shape, the warm-up runs of all models come first, then the timed repeats
    alternate between the models (so load on a shared machine hits them alike), then one
    extra run per model measures peak memory. Returns one :class:`SpeedResult` per model, in
    order. Raises :class:`ConfigError` for non-positive sizes."""
    _check_speed_args(prompt_len, new_tokens, batch_size, warmup, repeats)
    runners = [_SpeedRunner(m, prompt_len, new_tokens, batch_size, seed) for m in models]
    timings = median_timings([r.run for r in runners], prompt_len=prompt_len, new_tokens=new_tokens,
                             warmup=warmup, repeats=repeats, batch_size=batch_size)
    results = []
    for r, timing in zip(runners, timings):
        peak, kind = r.peak_memory()
        params, nbytes = _weights(r.model)
        results.append(SpeedResult(**timing, peak_memory_bytes=peak, memory_kind=kind, weight_bytes=nbytes,
                                   parameters=params, batch_size=batch_size, device=str(r.device)))
    return results


def measure_speed(
    model,
    *,
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch_size: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> SpeedResult:
    """Prefill and decode throughput (tokens/s) and peak memory of ``model`` on its device.

    A random prompt of shape ``(batch_size, prompt_len)`` (token ids drawn with ``seed``) is
    prefilled with ``use_cache=True``, then ``new_tokens`` tokens are decoded greedily one at a
    time on the KV cache (no early stop). ``warmup`` untimed runs, then ``repeats`` timed ones;
    the medians are reported (see :class:`SpeedResult`). Raises :class:`ConfigError` for
    non-positive sizes."""
    return compare_speed(
        [model],
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
        warmup=warmup,
        repeats=repeats,
        seed=seed,
    )[0]


# --------------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text rendering of the dict ``python -m slimllm eval`` writes with ``--json``
    (sections ``perplexity``, ``zero_shot`` and ``speed``, whichever are present)."""
    parts = [f"model: {report.get('model')}  ({report.get('parameters', 0):,} parameters, "
             f"{report.get('dtype')}, {report.get('device')})"]
    ppl = report.get("perplexity") or {}
    if ppl:
        rows = [
            [name, f"{r['ppl']:.2f}", str(r["seq_len"]), str(r["windows"]), str(r["tokens"]), f"{r['seconds']:.1f}"]
            for name, r in ppl.items()
        ]
        parts.append("Perplexity\n" + _table(["dataset", "ppl", "seq_len", "windows", "tokens", "s"], rows))
    zs = report.get("zero_shot")
    if zs:
        rows = []
        for name, r in zs["tasks"].items():
            rows.append([
                name,
                _fmt(None if r["acc"] is None else 100 * r["acc"], ".2f"),
                _fmt(None if r["acc_norm"] is None else 100 * r["acc_norm"], ".2f"),
                str(r["samples"] or "-"),
            ])
        rows.append([
            "average",
            _fmt(None if zs["average_acc"] is None else 100 * zs["average_acc"], ".2f"),
            _fmt(None if zs["average_acc_norm"] is None else 100 * zs["average_acc_norm"], ".2f"),
            "",
        ])
        title = "Zero-shot accuracy (%), lm-eval"
        if zs.get("limit"):
            title += f", first {zs['limit']} docs per task"
        parts.append(
            title + "\n" + _table(["task", "acc", "acc_norm", "n"], rows)
            + "\n(average acc_norm: acc_norm where the task defines it, else acc)"
        )
    sp = report.get("speed")
    if sp:
        rows = []
        for label, r in sp["models"].items():
            rows.append([
                label,
                f"{r['parameters']:,}",
                f"{r['prefill_tokens_per_s']:.1f}",
                f"{r['decode_tokens_per_s']:.1f}",
                _mib(r["peak_memory_bytes"]),
                _mib(r["weight_bytes"]),
            ])
        first = next(iter(sp["models"].values()))
        mem = {"cuda_max_allocated": "CUDA max allocated", "cpu_peak_rss_delta": "peak RSS delta"}.get(
            first["memory_kind"], first["memory_kind"]
        )
        title = (
            f"Speed ({first['device']}, batch {first['batch_size']}, prompt {first['prompt_len']}, "
            f"{first['new_tokens']} new tokens, median of {first['repeats']})"
        )
        parts.append(
            title + "\n" + _table(
                ["model", "params", "prefill tok/s", "decode tok/s", f"peak MiB ({mem})", "weights MiB"], rows
            )
        )
    return "\n\n".join(parts)
