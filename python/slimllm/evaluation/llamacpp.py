"""Measurements of an exported GGUF file in llama.cpp (through ``llama-cpp-python``).

The counterpart of :mod:`slimllm.evaluation.evaluate` for files written by
:func:`slimllm.io.gguf_export.export_gguf`: logits on token windows, perplexity over the same
windows ``slimllm eval`` scores (:func:`slimllm.evaluation.evaluate.tokenize_windows`: the
text tokenized once by the Hugging Face tokenizer of the folder, non-overlapping windows,
``ppl = exp(mean NLL)`` over the ``seq_len - 1`` predicted tokens of each window, each window
from an empty KV cache), and prefill / greedy-decode throughput.

``llama_cpp`` is imported on first use; without it every function raises
:class:`~slimllm.errors.MissingDependencyError`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from slimllm.errors import CheckpointError, ConfigError, MissingDependencyError
from slimllm.evaluation.evaluate import PerplexityResult, SpeedTimings, median_timings

__all__ = [
    "LlamaCppSpeed",
    "import_llama_cpp",
    "load_gguf",
    "window_logits",
    "window_nll",
    "perplexity",
    "compare_speed",
]

_INSTALL = "pip install llama-cpp-python (CPU build: CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable one)"


def import_llama_cpp():
    """The ``llama_cpp`` module. Raises :class:`MissingDependencyError` naming the package
    ``llama-cpp-python`` when it is not installed."""
    try:
        import llama_cpp
    except ImportError as err:
        raise MissingDependencyError(
            f"llama.cpp evaluation needs the package llama-cpp-python: {_INSTALL}; import failed: {err}"
        ) from err
    return llama_cpp


def load_gguf(
    path: str | os.PathLike,
    *,
    n_ctx: int,
    n_threads: int | None = None,
    logits_all: bool = False,
    n_batch: int | None = None,
):
    """Load the GGUF file ``path`` in llama.cpp on the CPU: a ``llama_cpp.Llama`` with a
    context of ``n_ctx`` tokens, ``n_threads`` threads for prefill and decode (``None``:
    llama.cpp's default), ``n_batch`` tokens per decode call (default ``n_ctx``, so a window
    goes through in one call) and, with ``logits_all``, the logits of every position kept
    (needed by :func:`window_logits`). Raises :class:`CheckpointError` for a missing file,
    :class:`ConfigError` for ``n_ctx < 2``, :class:`MissingDependencyError` without llama_cpp.
    """
    llama_cpp = import_llama_cpp()
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {os.fspath(path)} not found")
    if n_ctx < 2:
        raise ConfigError(f"n_ctx must be at least 2 tokens, got {n_ctx}")
    kwargs: dict[str, Any] = {}
    if n_threads is not None:
        kwargs = {"n_threads": n_threads, "n_threads_batch": n_threads}
    return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_batch or n_ctx,
                           logits_all=logits_all, verbose=False, **kwargs)


def _check_windows(llm, windows: np.ndarray) -> np.ndarray:
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ConfigError(f"windows must have shape (n_windows, seq_len >= 2), got {windows.shape}")
    if windows.shape[1] > llm.n_ctx():
        raise ConfigError(f"windows of {windows.shape[1]} tokens exceed the context of {llm.n_ctx()}")
    if not llm._logits_all:
        raise ConfigError("the model was loaded without logits_all=True; window logits need it")
    return windows


def _scores(llm, window: np.ndarray) -> np.ndarray:
    llm.reset()
    llm.eval(window.tolist())
    return llm.scores[: len(window)]


def window_logits(llm, windows) -> np.ndarray:
    """llama.cpp's float32 logits, shape ``(n_windows, seq_len, vocab)``, of each row of the
    integer array ``windows`` ``(n_windows, seq_len)``, every window from an empty KV cache.
    ``llm`` from :func:`load_gguf` with ``logits_all=True`` and ``n_ctx >= seq_len``, else
    :class:`ConfigError`."""
    windows = _check_windows(llm, windows)
    return np.stack([np.array(_scores(llm, w), dtype=np.float32) for w in windows])


def window_nll(llm, windows) -> np.ndarray:
    """Per-token negative log-likelihood (nats), float64 of shape ``(n_windows, seq_len - 1)``:
    entry ``[i, t] = -log softmax(logits of position t)[windows[i, t+1]]`` (the quantity
    :func:`slimllm.evaluation.evaluate.window_nll` computes in transformers), log-softmax in
    float64. Requirements and errors as :func:`window_logits`; one window's logits are held at
    a time."""
    windows = _check_windows(llm, windows)
    out = np.empty((windows.shape[0], windows.shape[1] - 1), dtype=np.float64)
    for i, w in enumerate(windows):
        logits = np.asarray(_scores(llm, w)[:-1], dtype=np.float64)
        top = logits.max(axis=-1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
        out[i] = lse - logits[np.arange(len(w) - 1), w[1:]]
    return out


def perplexity(
    path: str | os.PathLike,
    windows,
    *,
    n_threads: int | None = None,
    dataset: str = "text",
    source: str = "",
) -> PerplexityResult:
    """llama.cpp perplexity of the GGUF file ``path`` on ``windows`` (integer array or
    LongTensor ``(n_windows, seq_len)``, e.g. from
    :func:`slimllm.evaluation.evaluate.tokenize_windows` with the folder's tokenizer, so the
    windows are those ``slimllm eval`` scores): ``exp`` of the mean of :func:`window_nll`
    (LLM-Pruner's ``PPLMetric`` protocol). ``seconds`` includes loading the file. Errors as
    :func:`load_gguf` and :func:`window_logits`."""
    t0 = time.perf_counter()
    windows = np.asarray(windows)
    llm = load_gguf(path, n_ctx=int(windows.shape[1]), n_threads=n_threads, logits_all=True)
    try:
        nll = window_nll(llm, windows)
    finally:
        llm.close()
    mean = float(nll.mean())
    return PerplexityResult(dataset=dataset, source=source, ppl=math.exp(mean), nll=mean,
                            tokens=int(nll.size), windows=int(windows.shape[0]),
                            seq_len=int(windows.shape[1]), seconds=time.perf_counter() - t0)


@dataclass(kw_only=True)
class LlamaCppSpeed(SpeedTimings):
    """Throughput of one GGUF model in llama.cpp (timings as
    :class:`~slimllm.evaluation.evaluate.SpeedTimings`).

    ``prefill_tokens_per_s``: ``prompt_len`` / time of one decode call over the whole prompt
    from an empty KV cache (logits of the last position only). ``decode_tokens_per_s``:
    ``new_tokens`` / time of ``new_tokens`` greedy one-token calls on that cache (argmax of the
    last logits, no early stop). Times in seconds, batch 1, ``threads`` CPU threads."""

    threads: int


class _Runner:
    def __init__(self, llm, prompt: list[int], new_tokens: int):
        self.llm, self.prompt, self.new_tokens = llm, prompt, new_tokens
        llama_cpp = import_llama_cpp()
        n_vocab = llm.n_vocab()
        # logits_all=False: read the last position's logits from the context (llama.h API)
        self._last = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def run(self) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.prompt)
        token = int(self._last().argmax())
        t1 = time.perf_counter()
        for _ in range(self.new_tokens):
            llm.eval([token])
            token = int(self._last().argmax())
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def compare_speed(
    llms: Sequence[Any],
    *,
    prompt_len: int = 128,
    new_tokens: int = 128,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> list[LlamaCppSpeed]:
    """Prefill and greedy-decode tokens/s of several llama.cpp models side by side, as
    :func:`slimllm.evaluation.evaluate.compare_speed` does in transformers: one random prompt
    of ``prompt_len`` token ids (drawn with ``seed`` below the smallest vocabulary), all
    warm-up runs first, then the timed repeats alternating between the models, medians.

    ``llms``: ``llama_cpp.Llama`` objects from :func:`load_gguf` with
    ``n_ctx >= prompt_len + new_tokens`` (their thread counts are reported as loaded). Returns
    one :class:`LlamaCppSpeed` per model, in order. Raises :class:`ConfigError` for
    non-positive sizes or a context too small."""
    if prompt_len < 1 or new_tokens < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(
            f"speed: prompt_len, new_tokens, repeats >= 1 and warmup >= 0 required "
            f"(got {prompt_len}, {new_tokens}, {repeats}, {warmup})"
        )
    for llm in llms:
        if llm.n_ctx() < prompt_len + new_tokens:
            raise ConfigError(f"speed: context of {llm.n_ctx()} tokens < prompt_len + new_tokens = "
                              f"{prompt_len + new_tokens}")
    vocab = min(llm.n_vocab() for llm in llms)
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_len).tolist()
    runners = [_Runner(llm, prompt, new_tokens) for llm in llms]
    timings = median_timings([r.run for r in runners], prompt_len=prompt_len, new_tokens=new_tokens,
                             warmup=warmup, repeats=repeats)
    return [LlamaCppSpeed(**timing, threads=int(r.llm.context_params.n_threads))
            for r, timing in zip(runners, timings)]
