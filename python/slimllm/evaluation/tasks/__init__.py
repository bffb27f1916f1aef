"""Local zero-shot task definitions for lm-eval (lm-evaluation-harness 0.4.x).

This folder holds one YAML config per task (``piqa.yaml``, ``arc_easy.yaml``, ...). Each one
mirrors lm-eval's own definition of the task (same prompt ``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``target_delimiter``, ``process_docs`` and ``metric_list``, the functions taken
from lm-eval itself where it defines them in Python) and differs in one respect only: the
documents come from the local files in the evaluation data folder (see
``shared/data/PROVENANCE.md``) through the loaders in :mod:`slimllm.evaluation.tasks.local_data`, converted
to the Hugging Face schema lm-eval's configs expect, instead of from the hub. Training splits are
left out (zero-shot only).

Pass :data:`TASKS_DIR` to ``lm_eval.tasks.TaskManager(include_path=...)`` with
``metadata={"data_dir": ...}``; :func:`slimllm.evaluation.evaluate.zero_shot` does that.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Folder of the YAML task configs (give it to lm-eval's ``TaskManager(include_path=...)``).
TASKS_DIR = Path(__file__).resolve().parent

#: Files each local task reads, relative to the data folder.
TASK_FILES: dict[str, tuple[str, ...]] = {
    "boolq": ("boolq/val.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_subset1000.jsonl",),
    "winogrande": ("winogrande/winogrande.llmfoundry.jsonl", "winogrande/dev-labels.lst"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/test.tsv",),
}

#: The zero-shot tasks of the paper's protocol, in the order of its tables.
LOCAL_TASKS: tuple[str, ...] = tuple(TASK_FILES)

#: Environment variable naming the evaluation data folder.
DATA_DIR_ENV = "SLIMLLM_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The evaluation data folder: ``data_dir`` if given, else ``$SLIMLLM_DATA_DIR``, else
    ``../shared/data`` relative to the current working directory. The folder is not checked
    here (callers report the exact missing file)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.cwd().parent / "shared" / "data"


def missing_task_files(task: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files local task ``task`` needs that are absent from the data folder (empty when
    all are present). Raises ``KeyError`` for a task with no local definition."""
    root = resolve_data_dir(data_dir)
    return [root / rel for rel in TASK_FILES[task] if not (root / rel).is_file()]


__all__ = [
    "TASKS_DIR",
    "TASK_FILES",
    "LOCAL_TASKS",
    "DATA_DIR_ENV",
    "resolve_data_dir",
    "missing_task_files",
]
