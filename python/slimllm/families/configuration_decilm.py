"""The Nemotron-NAS (``DeciLMForCausalLM``) config that :mod:`slimllm.io.vllm_export` writes
next to a per-layer vLLM export, loaded there with ``trust_remote_code=True`` (transformers has
no ``nemotron-nas`` model type). Self-contained: it imports only transformers.

It is a ``LlamaConfig`` with ``block_configs``: one entry per decoder layer, read by vLLM's
``vllm/model_executor/models/nemotron_nas.py`` as attributes,
``block_configs[i].attention.n_heads_in_group`` (query heads per KV head, so the layer has
``num_attention_heads // n_heads_in_group`` KV heads), ``block_configs[i].ffn.intermediate_size``
and the ``no_op`` / ``replace_with_linear`` flags (always false here). In config.json each
entry is a plain dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import LlamaConfig


@dataclass
class AttentionConfig:
    """One layer's attention: ``n_heads_in_group`` query heads share each KV head."""

    n_heads_in_group: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass
class FFNConfig:
    """One layer's MLP: ``intermediate_size`` channels (gate/up rows, down_proj columns)."""

    intermediate_size: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass
class BlockConfig:
    """One decoder layer of a Nemotron-NAS model."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlockConfig":
        return cls(AttentionConfig(**data.get("attention", {})), FFNConfig(**data.get("ffn", {})))


class DeciLMConfig(LlamaConfig):
    """``LlamaConfig`` plus ``block_configs`` (a list of :class:`BlockConfig` or dicts)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_configs = [
            block if isinstance(block, BlockConfig) else BlockConfig.from_dict(block)
            for block in (block_configs or [])
        ]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["block_configs"] = [asdict(block) for block in self.block_configs]
        return data
