"""Reading back what a test saved (shared by the save / stream / resume / distributed tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder``, by checkpoint name (the shards
    read in name order; a name in two shards keeps the later one's tensor)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out
