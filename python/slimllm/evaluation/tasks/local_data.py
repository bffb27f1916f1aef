"""Loaders of the local zero-shot evaluation files, for lm-eval's ``custom_dataset`` hook.

Each ``load_<task>(data_dir=None, **metadata)`` reads the original release files of one task
from the data folder (layout and provenance: ``shared/data/PROVENANCE.md``) and returns a
``datasets.DatasetDict`` with the one evaluation split lm-eval's own task uses, its records in
the schema of the Hugging Face dataset lm-eval's config names (so the config's ``doc_to_text``,
``doc_to_choice`` and ``doc_to_target`` apply unchanged):

=============  =====================================  ==========  =====
task           lm-eval's hub dataset                  split       docs
=============  =====================================  ==========  =====
boolq          aps/super_glue (boolq)                 validation  3270
piqa           baber/piqa                             validation  1838
hellaswag      Rowan/hellaswag                        validation  1000 (of 10042: local subset)
winogrande     allenai/winogrande (winogrande_xl)     validation  1267
arc_easy       allenai/ai2_arc (ARC-Easy)             test        2376
arc_challenge  allenai/ai2_arc (ARC-Challenge)        test        1172
openbookqa     allenai/openbookqa (main)              test        500
=============  =====================================  ==========  =====

lm-eval calls the loaders with the task's metadata as keyword arguments; ``data_dir`` comes from
``TaskManager(metadata={"data_dir": ...})`` (else ``$SLIMLLM_DATA_DIR``, else
``../shared/data``). A missing or malformed file raises :class:`slimllm.errors.ConfigError`
naming the file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from slimllm.errors import ConfigError
from slimllm.evaluation.tasks import resolve_data_dir


def _file(data_dir: str | os.PathLike | None, rel: str) -> Path:
    path = resolve_data_dir(data_dir) / rel
    if not path.is_file():
        raise ConfigError(
            f"evaluation data file {path} not found (set --data-dir or $SLIMLLM_DATA_DIR "
            "to the folder described in shared/data/PROVENANCE.md)"
        )
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return records


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(split: str, records: list[dict[str, Any]], path: Path):
    import datasets

    if not records:
        raise ConfigError(f"{path}: no records")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def _field(record: dict[str, Any], key: str, path: Path, index: int) -> Any:
    try:
        return record[key]
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: record {index} has no field {key!r}") from None


def load_boolq(data_dir: str | os.PathLike | None = None, **_: Any):
    """BoolQ dev (SuperGLUE layout ``boolq/val.jsonl``) -> ``{"validation": 3270 docs}`` with
    fields ``question``, ``passage``, ``idx`` (int) and ``label`` (int, 1 = true), as in
    ``aps/super_glue``. Raises ConfigError for a missing/malformed file."""
    path = _file(data_dir, "boolq/val.jsonl")
    records = []
    for i, r in enumerate(_jsonl(path)):
        label = _field(r, "label", path, i)
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise ConfigError(f"{path}: record {i} has label {label!r}")
            label = label.lower() == "true"
        records.append(
            {
                "question": _field(r, "question", path, i),
                "passage": _field(r, "passage", path, i),
                "idx": int(r.get("idx", i)),
                "label": int(bool(label)),
            }
        )
    return _dataset("validation", records, path)


def load_piqa(data_dir: str | os.PathLike | None = None, **_: Any):
    """PIQA valid (``piqa/valid.jsonl`` + ``piqa/valid-labels.lst``) -> ``{"validation": 1838
    docs}`` with fields ``goal``, ``sol1``, ``sol2``, ``label`` (0/1), as in ``baber/piqa``.
    Raises ConfigError for a missing/malformed file or a label count that differs."""
    path = _file(data_dir, "piqa/valid.jsonl")
    labels_path = _file(data_dir, "piqa/valid-labels.lst")
    docs, labels = _jsonl(path), _lines(labels_path)
    if len(docs) != len(labels):
        raise ConfigError(f"{path} has {len(docs)} records but {labels_path} {len(labels)} labels")
    records = [
        {
            "goal": _field(d, "goal", path, i),
            "sol1": _field(d, "sol1", path, i),
            "sol2": _field(d, "sol2", path, i),
            "label": int(label),
        }
        for i, (d, label) in enumerate(zip(docs, labels))
    ]
    return _dataset("validation", records, path)


def load_hellaswag(data_dir: str | os.PathLike | None = None, **_: Any):
    """HellaSwag val, the local 1000-example subset in the original rowanz schema
    (``hellaswag/hellaswag_val_subset1000.jsonl``) -> ``{"validation": 1000 docs}`` with the
    fields of ``Rowan/hellaswag`` (``label`` as a string, as there); lm-eval's own
    ``process_docs`` then builds ``query``/``choices``/``gold``."""
    path = _file(data_dir, "hellaswag/hellaswag_val_subset1000.jsonl")
    records = []
    for i, r in enumerate(_jsonl(path)):
        records.append(
            {
                "ind": int(r.get("ind", i)),
                "activity_label": _field(r, "activity_label", path, i),
                "ctx_a": _field(r, "ctx_a", path, i),
                "ctx_b": _field(r, "ctx_b", path, i),
                "ctx": r.get("ctx", ""),
                "endings": list(_field(r, "endings", path, i)),
                "source_id": r.get("source_id", ""),
                "split": r.get("split", "val"),
                "split_type": r.get("split_type", ""),
                "label": str(_field(r, "label", path, i)),
            }
        )
    return _dataset("validation", records, path)


def _winogrande_fields(options: list[str], continuation: str) -> tuple[str, str, str]:
    """Split llm-foundry's ``context_options`` (sentence up to the blank + option) into the
    sentence prefix and the two options: the prefix is their common prefix cut back to just
    after its last whitespace, so ``prefix + option_i == context_options[i]`` exactly (the only
    thing lm-eval's WinoGrande functions use besides the continuation)."""
    a, b = options
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = n
    while cut > 0 and not a[cut - 1].isspace():
        cut -= 1
    prefix = a[:cut]
    sentence = f"{prefix}_ {continuation}" if continuation else f"{prefix}_"
    return sentence, a[cut:], b[cut:]


def load_winogrande(data_dir: str | os.PathLike | None = None, **_: Any):
    """WinoGrande dev, xl/1.1 (``winogrande/winogrande.llmfoundry.jsonl`` for the sentences,
    ``winogrande/dev-labels.lst`` for the official labels) -> ``{"validation": 1267 docs}`` with
    the fields of ``allenai/winogrande``: ``sentence`` (with the ``_`` blank), ``option1``,
    ``option2``, ``answer`` ("1"/"2"). The sentence is rebuilt from llm-foundry's
    ``context_options``/``continuation``; lm-eval's ``doc_to_choice`` (text up to the blank +
    option) and ``doc_to_target`` (text after the blank, stripped) give back exactly those
    strings. Raises ConfigError when the two files disagree on the gold answer."""
    path = _file(data_dir, "winogrande/winogrande.llmfoundry.jsonl")
    labels_path = _file(data_dir, "winogrande/dev-labels.lst")
    docs, labels = _jsonl(path), _lines(labels_path)
    if len(docs) != len(labels):
        raise ConfigError(f"{path} has {len(docs)} records but {labels_path} {len(labels)} labels")
    records = []
    for i, (d, answer) in enumerate(zip(docs, labels)):
        options = list(_field(d, "context_options", path, i))
        continuation = str(_field(d, "continuation", path, i)).strip()
        if len(options) != 2 or answer not in ("1", "2"):
            raise ConfigError(f"{path}: record {i} is not a two-option WinoGrande item")
        if "gold" in d and int(d["gold"]) != int(answer) - 1:
            raise ConfigError(f"{path}: record {i} gold {d['gold']} disagrees with {labels_path}")
        sentence, option1, option2 = _winogrande_fields(options, continuation)
        records.append({"sentence": sentence, "option1": option1, "option2": option2, "answer": answer})
    return _dataset("validation", records, path)


def _arc(data_dir: str | os.PathLike | None, rel: str):
    path = _file(data_dir, rel)
    records = []
    for i, r in enumerate(_jsonl(path)):
        question = _field(r, "question", path, i)
        choices = _field(question, "choices", path, i)
        records.append(
            {
                "id": r.get("id", str(i)),
                "question": _field(question, "stem", path, i),
                "choices": {
                    "text": [c["text"] for c in choices],
                    "label": [c["label"] for c in choices],
                },
                "answerKey": _field(r, "answerKey", path, i),
            }
        )
    return _dataset("test", records, path)


def load_arc_easy(data_dir: str | os.PathLike | None = None, **_: Any):
    """ARC-Easy test (original AI2 jsonl ``arc_easy/ARC-Easy-Test.jsonl``) -> ``{"test": 2376
    docs}`` with the fields of ``allenai/ai2_arc``: ``id``, ``question`` (the stem),
    ``choices`` ``{"text": [...], "label": [...]}``, ``answerKey``."""
    return _arc(data_dir, "arc_easy/ARC-Easy-Test.jsonl")


def load_arc_challenge(data_dir: str | os.PathLike | None = None, **_: Any):
    """ARC-Challenge test (``arc_challenge/ARC-Challenge-Test.jsonl``) -> ``{"test": 1172
    docs}``, fields as :func:`load_arc_easy`."""
    return _arc(data_dir, "arc_challenge/ARC-Challenge-Test.jsonl")


_OBQA_CHOICE = re.compile(r"\(([A-D])\) ")


def load_openbookqa(data_dir: str | os.PathLike | None = None, **_: Any):
    """OpenBookQA main test (original release ``openbookqa/test.tsv``) -> ``{"test": 500
    docs}`` with the fields of ``allenai/openbookqa`` (main): ``id``, ``question_stem``,
    ``choices`` ``{"text": [...], "label": ["A".."D"]}``, ``answerKey``. The TSV's ``Choices``
    string ``(A) ... (B) ...`` is split on ``\\(([A-D])\\) ``."""
    path = _file(data_dir, "openbookqa/test.tsv")
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, row in enumerate(reader):
            parts = _OBQA_CHOICE.split(_field(row, "Choices", path, i))
            # ['', 'A', text, 'B', text, ...]
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if parts[0].strip() or len(labels) != 4:
                raise ConfigError(f"{path}: record {i} has unparseable choices {row['Choices']!r}")
            records.append(
                {
                    "id": _field(row, "ID", path, i),
                    "question_stem": _field(row, "Question Stem", path, i),
                    "choices": {"text": texts, "label": labels},
                    "answerKey": _field(row, "Answer Key", path, i).strip(),
                }
            )
    return _dataset("test", records, path)


LOADERS = {
    "boolq": load_boolq,
    "piqa": load_piqa,
    "hellaswag": load_hellaswag,
    "winogrande": load_winogrande,
    "arc_easy": load_arc_easy,
    "arc_challenge": load_arc_challenge,
    "openbookqa": load_openbookqa,
}

__all__ = [*(f"load_{name}" for name in LOADERS), "LOADERS"]
