"""Calibration token batches: N sequences of L tokens (DESIGN.md section 1; the paper uses 32 x 128,
slimllm defaults to 128 x 128, from text or self-generated: ``FILE_SAMPLES``,
``SELF_SAMPLES``).

Sources:

- a plain text file (``.txt``, ``.raw``, anything not ``.jsonl``): the whole file is one token
  stream; N windows of L tokens start at random positions of it;
- a JSON-lines file (``.jsonl``, one object per line with a text field, ``"text"`` by default):
  the usual recipe of the pruning literature (SparseGPT / Wanda C4 loader): documents are visited
  in a random order and every document of at least L tokens gives one window of L tokens at a
  random offset; if fewer than N documents are long enough, the documents are joined with
  ``"\\n\\n"`` and treated as one stream like a plain text file;
- a Hugging Face hub dataset (``datasets.load_dataset``, streamed; needs network access): the
  first ``hub_documents`` documents of the split are used like a JSON-lines file;
- the model itself (:func:`self_generated`, the data-free default of ``python -m slimllm prune``):
  sequences sampled from the model's own distribution, as in self-calibration (Williams et al.,
  "Self-calibration for language model quantization and pruning", 2024).

Everything is deterministic under ``seed`` (Python's ``random.Random(seed)``). Windows are
tokenized without special tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from slimllm.errors import CalibrationError

#: default N for calibration from text (a file or a dataset): on SmolLM2-135M at 20%, 128 x 128
#: C4 tokens give WikiText-2 99.65 (mean of seeds 0/1/2) against 108.29 for the paper's 32 x 128,
#: for about 2.5x the prune time (benches/README.md, "Default recovery")
FILE_SAMPLES = 128
#: default N for self-calibration: on SmolLM2-135M at 20%, 128 self-generated x 128 tokens give
#: WikiText-2 99.08 / PTB 139.92 (mean of seeds 0/1/2) against 104.15 / 145.55 for 32 (seed 0;
#: benches/README.md, "Self-calibration")
SELF_SAMPLES = 128
#: default number of sequences self-calibration samples at once: a decode step reads every
#: weight of the model whatever the batch, so wider batches cost little more per step (on 2 CPU
#: cores 32 x 128 tokens took 23.2 s at 32 against 60.6 s at 8, side by side in benches/speed.py,
#: 2.61x); the KV cache then holds
#: ``SELF_BATCH x L`` tokens of every layer (SmolLM2-135M fp32, L = 128: 0.2 GiB)
SELF_BATCH = 32

__all__ = [
    "CalibrationSet",
    "load_calibration",
    "from_documents",
    "read_documents",
    "self_generated",
    "FILE_SAMPLES",
    "SELF_SAMPLES",
    "SELF_BATCH",
]


@dataclass
class CalibrationSet:
    """N calibration sequences of L tokens.

    Attributes:
        input_ids: ``torch.LongTensor`` of shape (N, L).
        description: JSON-serialisable provenance: ``source``, ``kind`` (``"text"``,
            ``"jsonl"``, ``"hub"``, ``"tensor"``), ``num_samples``, ``seq_len``, ``seed``,
            ``mode`` (``"documents"`` or ``"stream"``), ``tokens_available`` where counted.
    """

    input_ids: Any
    description: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """N, the number of sequences."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """L, tokens per sequence."""
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> list:
        """``input_ids`` split into chunks of at most ``batch_size`` sequences."""
        return list(self.input_ids.split(batch_size, dim=0))


def _check_counts(num_samples: int, seq_len: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise CalibrationError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise CalibrationError(f"seq_len must be a positive integer, got {seq_len!r}")


def read_documents(path: str | Path, text_field: str = "text") -> tuple[list[str], str]:
    """Read a calibration file into documents.

    Returns ``(documents, kind)``: ``kind`` is ``"jsonl"`` for a ``.jsonl`` file (one document
    per line, the string field ``text_field`` of each JSON object; blank lines skipped) and
    ``"text"`` otherwise (the whole file is one document).

    Raises:
        CalibrationError: the file is missing or not a file, is not valid UTF-8 (the message
            gives the byte offset), a JSON line is invalid or lacks ``text_field``, or the file
            holds no text at all.
    """
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} is not a regular file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"calibration file {path} is not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from None
    if path.suffix.lower() == ".jsonl":
        docs: list[str] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(
                    f"calibration file {path}, line {lineno}: invalid JSON ({err.msg})"
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise CalibrationError(
                    f"calibration file {path}, line {lineno}: no string field {text_field!r}"
                )
            if obj[text_field].strip():
                docs.append(obj[text_field])
        kind = "jsonl"
    else:
        docs = [text] if text.strip() else []
        kind = "text"
    if not docs:
        raise CalibrationError(f"calibration file {path} is empty (no text found)")
    return docs, kind


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def from_documents(
    tokenizer,
    documents: Sequence[str],
    num_samples: int = FILE_SAMPLES,
    seq_len: int = 128,
    seed: int = 0,
    source: str = "<documents>",
    kind: str = "documents",
):
    """Draw ``num_samples`` windows of ``seq_len`` tokens from ``documents``.

    Recipe (deterministic under ``seed``): with more than one document, visit documents in a
    random order and take one random window from each document of at least ``seq_len`` tokens
    until ``num_samples`` are found ("documents" mode); otherwise, or when too few documents are
    long enough, tokenize the documents joined with ``"\\n\\n"`` and take ``num_samples`` windows
    at random offsets of that stream ("stream" mode).

    Returns:
        CalibrationSet with ``input_ids`` (num_samples, seq_len) int64.

    Raises:
        CalibrationError: no documents, or fewer than ``num_samples * seq_len`` tokens in all
            (the message gives the count found and the count needed).
    """
    import torch

    _check_counts(num_samples, seq_len)
    docs = [d for d in documents if d and d.strip()]
    if not docs:
        raise CalibrationError(f"calibration source {source} holds no text")
    rng = random.Random(seed)
    description = {
        "source": str(source),
        "kind": kind,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
    }
    windows: list[list[int]] = []
    if len(docs) > 1:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for index in order:
            ids = _encode(tokenizer, docs[index])
            if len(ids) >= seq_len:
                start = rng.randint(0, len(ids) - seq_len)
                windows.append(ids[start : start + seq_len])
                if len(windows) == num_samples:
                    break
        if len(windows) == num_samples:
            description["mode"] = "documents"
            description["documents"] = len(docs)
            return CalibrationSet(torch.tensor(windows, dtype=torch.long), description)
        rng = random.Random(seed)  # stream mode restarts from the seed
    stream = _encode(tokenizer, "\n\n".join(docs))
    needed = num_samples * seq_len
    if len(stream) < needed:
        raise CalibrationError(
            f"calibration source {source} is too short: {len(stream)} tokens found, "
            f"{needed} needed ({num_samples} x {seq_len})"
        )
    windows = []
    for _ in range(num_samples):
        start = rng.randint(0, len(stream) - seq_len)
        windows.append(stream[start : start + seq_len])
    description["mode"] = "stream"
    description["documents"] = len(docs)
    description["tokens_available"] = len(stream)
    return CalibrationSet(torch.tensor(windows, dtype=torch.long), description)


def _hub_documents(name: str, config: str | None, split: str, text_field: str, limit: int):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is optional
        raise CalibrationError(
            f"calibration dataset {name!r} needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        stream: Iterable[dict] = datasets.load_dataset(name, config, split=split, streaming=True)
        docs = []
        for row in stream:
            value = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                raise CalibrationError(
                    f"calibration dataset {name!r} has no string field {text_field!r}"
                )
            if value.strip():
                docs.append(value)
            if len(docs) >= limit:
                break
    except CalibrationError:
        raise
    except Exception as err:  # network, missing dataset/config/split
        raise CalibrationError(
            f"cannot load calibration dataset {name!r} (config {config!r}, split {split!r}) "
            f"from the hub: {type(err).__name__}: {err}"
        ) from None
    if not docs:
        raise CalibrationError(f"calibration dataset {name!r} split {split!r} is empty")
    return docs


def load_calibration(
    tokenizer,
    calib_file: str | Path | None = None,
    *,
    dataset: str | None = None,
    num_samples: int = FILE_SAMPLES,
    seq_len: int = 128,
    seed: int = 0,
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str = "train",
    hub_documents: int = 5000,
):
    """Calibration sequences from a file or a hub dataset (exactly one of them).

    Args:
        tokenizer: a transformers tokenizer (called with ``add_special_tokens=False``).
        calib_file: plain text file, or ``.jsonl`` with a ``text_field`` string per line.
        dataset: hub dataset name for ``datasets.load_dataset`` (streamed; needs network),
            with ``dataset_config`` and ``dataset_split``; its first ``hub_documents``
            documents are the pool the windows are drawn from.
        num_samples, seq_len: N and L (default 128 x 128; the paper's is 32 x 128).
        seed: seed of the window draw.

    Returns:
        CalibrationSet, ``input_ids`` (N, L) int64, with a JSON-serialisable ``description``.

    Raises:
        CalibrationError: both or neither source given; missing, empty, non-UTF-8 or too short
            file (message: tokens found vs needed); hub dataset unreachable or without text.
    """
    _check_counts(num_samples, seq_len)
    if (calib_file is None) == (dataset is None):
        raise CalibrationError("give exactly one calibration source: a file or a hub dataset")
    if calib_file is not None:
        docs, kind = read_documents(calib_file, text_field=text_field)
        return from_documents(
            tokenizer, docs, num_samples, seq_len, seed, source=str(calib_file), kind=kind
        )
    docs = _hub_documents(dataset, dataset_config, dataset_split, text_field, hub_documents)
    source = dataset if dataset_config is None else f"{dataset}/{dataset_config}"
    calib = from_documents(
        tokenizer, docs, num_samples, seq_len, seed, source=f"{source}:{dataset_split}", kind="hub"
    )
    return calib


def self_generated(
    model,
    tokenizer,
    num_samples: int = SELF_SAMPLES,
    seq_len: int = 128,
    seed: int = 0,
    *,
    batch_size: int = SELF_BATCH,
    temperature: float = 1.0,
    progress: bool = True,
):
    """Calibration sequences sampled from the model itself (no dataset needed).

    Every sequence starts with the tokenizer's BOS token (EOS when there is none) and continues
    with ``seq_len - 1`` tokens drawn by ancestral sampling from the model's next-token
    distribution at ``temperature`` (no top-k / top-p truncation; EOS is suppressed so every
    sequence has full length). Runs on the model's device in chunks of ``batch_size``
    sequences. Deterministic under ``seed`` on a given device (``torch.manual_seed``).

    Args:
        model: a transformers causal LM (the dense model that will be pruned).
        tokenizer: its tokenizer (for the BOS / EOS ids).
        num_samples, seq_len: N and L, as for file calibration.
        seed: seed of the sampling.
        batch_size: sequences generated at once (the draw depends on it: the same seed with
            another ``batch_size`` gives other sequences).
        temperature: sampling temperature (> 0).
        progress: show a tqdm bar of the sampled tokens (``num_samples * (seq_len - 1)`` in
            all, advanced at every decode step); it does not change the draw.

    Returns:
        CalibrationSet with ``input_ids`` (num_samples, seq_len) int64 on the CPU and
        ``description`` ``{"source": "self", "kind": "self", ...}``.

    Raises:
        CalibrationError: bad counts, batch size or temperature, or a tokenizer with neither
            BOS nor EOS.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    _check_counts(num_samples, seq_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"self-calibration batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise CalibrationError(f"self-calibration temperature must be > 0, got {temperature!r}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("self-calibration needs a tokenizer with a BOS or EOS token")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    rows = []
    bar = tqdm(total=num_samples * (seq_len - 1), desc="self-calibration", unit="tok",
               disable=not progress)

    class _Counter(BaseStreamer):
        # generate() puts the prompt once, then each step's new tokens: count only the latter
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                bar.update(value.shape[0])
            self.prompt_seen = True

        def end(self):
            pass

    with torch.no_grad(), bar:
        for first in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=float(temperature),
                top_k=0,
                top_p=1.0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                suppress_tokens=None if eos is None else [eos],
                pad_token_id=eos if eos is not None else start,
                streamer=_Counter() if progress else None,
            )
            rows.append(out[:, :seq_len].cpu())
    description = {
        "source": "self",
        "kind": "self",
        "num_samples": num_samples,
        "seq_len": seq_len,
        "seed": seed,
        "batch_size": batch_size,
        "temperature": float(temperature),
    }
    return CalibrationSet(torch.cat(rows, dim=0), description)
