"""OLMo 2 specifics, on tiny random models built from transformers' own ``Olmo2Config``
(conftest's ``make_tiny_model``, norm weights randomised: no download).

What OLMo 2 changes against the Llama layout, and where each is checked:

- ``q_norm`` / ``k_norm`` are RMSNorms over the *whole* q_proj / k_proj output (H*h, G*h):
  removing heads slices their weights, and their RMS is then taken over the kept heads only.
  Here: the sliced attention equals an explicit float64 brute force of the kept heads (their
  rows of the dense weights, the RMS over the kept rows, RoPE, causal softmax), in uniform GQA,
  kv-group and MHA layouts; the o_proj recovery is the least-squares fit of the dense output on
  the *sliced* attention's o_proj inputs (not on the dense ones). Whole models:
  ``test_pipeline.py::test_sliced_model_equals_masked_model`` (every recovery mode, GQA and
  MHA) against a dense-shaped reference whose norms are masked to the kept heads
  (``width_norms.py``), and ``test_slicing.py`` (random per-layer head sets, kv-group removal);
- post norms only (no input norm; ``post_attention_layernorm`` / ``post_feedforward_layernorm``
  on the o_proj / down_proj outputs): the recovery fits those projections' own outputs, checked
  by the brute-force fit here and the masked-model comparison;
- saved checkpoints: the per-layer remote code resizes q_norm / k_norm (round trip here, and
  ``test_checkpoint.py::test_non_uniform_round_trip``), a uniform prune without recovery
  gets the stock config, a streamed (resumable) prune plans the sliced norm shapes;
- no GGUF: transformers' GGUF loader and slimllm's exporter have no olmo2, refused with a typed
  error.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from saved import folder_tensors

from slimllm.errors import ConfigError, UnsupportedArchitectureError
from slimllm.families.adapters import get_adapter
from slimllm.io import checkpoint
from slimllm.io.gguf_export import export_gguf
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.ratios import count_parameters
from slimllm.pruning.slicing import keep_heads

HEAD_DIM = 16


def _tokens(vocab: int, n: int = 3, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rows(heads):
    return [a * HEAD_DIM + j for a in heads for j in range(HEAD_DIM)]


def _brute_force_attention(dense_attn, x, cos, sin, kept, kept_kv, group, eps):
    """float64 attention of the kept heads from the dense module's weights: q/k/v rows of the
    kept (KV) heads, RMS norms over the kept rows with the kept norm weights, half-split RoPE,
    causal softmax with scale h**-0.5, o_proj on the kept columns (no bias)."""
    f = lambda t: t.detach().double()  # noqa: E731
    qr, kr = _rows(kept), _rows(kept_kv)
    x = f(x)
    q = x @ f(dense_attn.q_proj.weight)[qr].T
    k = x @ f(dense_attn.k_proj.weight)[kr].T
    v = x @ f(dense_attn.v_proj.weight)[kr].T
    q = q / torch.sqrt((q**2).mean(-1, keepdim=True) + eps) * f(dense_attn.q_norm.weight)[qr]
    k = k / torch.sqrt((k**2).mean(-1, keepdim=True) + eps) * f(dense_attn.k_norm.weight)[kr]
    b, length = x.shape[:2]

    def heads(t):
        return t.reshape(b, length, -1, HEAD_DIM).transpose(1, 2)

    def rope(t):
        half = torch.cat([-t[..., HEAD_DIM // 2:], t[..., : HEAD_DIM // 2]], dim=-1)
        return t * f(cos)[:, None] + half * f(sin)[:, None]

    q, k, v = rope(heads(q)), rope(heads(k)), heads(v)
    kv_of = [kept_kv.index(a // group) for a in kept]  # the KV head each kept query head reads
    scores = q @ k[:, kv_of].transpose(-1, -2) * HEAD_DIM**-0.5
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    out = (weights @ v[:, kv_of]).transpose(1, 2).reshape(b, length, -1)
    return out @ f(dense_attn.o_proj.weight)[:, qr].T


@pytest.mark.parametrize(
    "num_kv, kept, kept_kv",
    [(2, [1, 2], None), (2, [2, 3], [1]), (4, [0, 2, 3], None)],
    ids=["uniform-GQA", "kv-group", "MHA"],
)
def test_sliced_attention_equals_brute_force_of_kept_heads(make_tiny_model, num_kv, kept, kept_kv):
    """keep_heads slices q_norm / k_norm with the kept rows, and the sliced attention of every
    layer equals the brute force above on that layer's inputs (the sliced model's own hidden
    states), which differs from the dense attention restricted to the kept heads."""
    dense = make_tiny_model("olmo2", num_heads=4, num_kv_heads=num_kv, layers=2)
    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    group = 4 // num_kv
    kv_kept = kept_kv if kept_kv is not None else sorted({a // group for a in kept})
    for layer, dense_layer in zip(adapter.layers(model), adapter.layers(dense), strict=True):
        keep_heads(adapter, layer, kept, kept_kv)
        attn, dense_attn = adapter.attention(layer), adapter.attention(dense_layer)
        assert torch.equal(attn.q_norm.weight, dense_attn.q_norm.weight[_rows(kept)])
        assert torch.equal(attn.k_norm.weight, dense_attn.k_norm.weight[_rows(kv_kept)])
        assert attn.q_norm.weight.shape == (len(kept) * HEAD_DIM,)
        assert attn.k_norm.weight.shape == (len(kv_kept) * HEAD_DIM,)
    seen = []

    def record(module, args, kwargs, out):
        seen.append((kwargs["hidden_states"], kwargs["position_embeddings"], out[0]))

    handles = [adapter.attention(layer).register_forward_hook(record, with_kwargs=True)
               for layer in adapter.layers(model)]
    try:
        _logits(model, _tokens(model.config.vocab_size))
    finally:
        for handle in handles:
            handle.remove()
    eps = model.config.rms_norm_eps
    for (x, (cos, sin), got), dense_layer in zip(seen, adapter.layers(dense), strict=True):
        dense_attn = adapter.attention(dense_layer)
        want = _brute_force_attention(dense_attn, x, cos, sin, kept, kv_kept, group, eps)
        scale = float(want.abs().max())
        err = float((got.double() - want).abs().max())
        assert err <= 1e-5 * scale
        # the dense model's kept heads (norms over all heads) give other outputs
        with torch.no_grad():
            full_rows = _rows(kept)
            saved = dense_attn.o_proj.weight.detach().clone()
            dense_attn.o_proj.weight[:, [c for c in range(4 * HEAD_DIM) if c not in full_rows]] = 0
            masked = dense_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
            dense_attn.o_proj.weight.copy_(saved)
        assert (masked.double() - want).abs().max() > 1e-3 * scale  # ~1-2% here, err ~2e-7


def _o_proj_io(model, ids):
    """Materialised float64 (tokens, features) o_proj input of layer 0."""
    seen = []
    o_proj = get_adapter(model).attention(get_adapter(model).layers(model)[0]).o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    x = torch.cat(seen)
    return x.reshape(-1, x.shape[-1]).double().numpy()


@pytest.mark.parametrize("recovery", ["affine", "ridge"])
def test_o_proj_recovery_is_fitted_on_the_sliced_attention(make_tiny_model, recovery):
    """Layer 0 sees the dense inputs: its recovered o_proj (weight and bias) is the fit of the
    dense output y = x W^T on the sliced attention's o_proj inputs x'_K (per-coordinate
    np.polyfit for affine; np.linalg.lstsq for ridge at damp ~0), and not the fit on the dense
    kept inputs x_K that families without width norms use."""
    dense = make_tiny_model("olmo2", num_heads=4, num_kv_heads=2, layers=2)
    calib = _tokens(dense.config.vocab_size, n=8, length=24, seed=3)
    config = PruneConfig(layer_ratios=(0.3, 0.0), recovery=recovery, ridge_damp=1e-9, batch_size=3,
                         progress=False)
    model, report = prune_model(copy.deepcopy(dense), None, calib, config)
    entry = report["layers"][0]
    assert entry["heads_removed"] == 2 and entry["channels_removed"] > 0
    cols = _rows(entry["kept_heads"])
    x = _o_proj_io(dense, calib)
    x_sliced = _o_proj_io(model, calib)  # the pruned attention's o_proj input: x'_K
    w = dense.model.layers[0].self_attn.o_proj.weight.detach().double().numpy()
    y = x @ w.T
    o_proj = model.model.layers[0].self_attn.o_proj
    got_w, got_b = o_proj.weight.detach().double().numpy(), o_proj.bias.detach().double().numpy()

    def fit(inputs):
        if recovery == "affine":
            y_kept = inputs @ w[:, cols].T
            fits = np.array([np.polyfit(y_kept[:, j], y[:, j], 1) for j in range(w.shape[0])])
            return w[:, cols] * fits[:, :1], fits[:, 1]
        design = np.hstack([inputs, np.ones((len(inputs), 1))])
        sol = np.linalg.lstsq(design, y, rcond=None)[0]
        return sol[:-1].T, sol[-1]

    want_w, want_b = fit(x_sliced)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-5)
    # the fit on the dense kept inputs is another one, and reconstructs y worse from x'_K
    dense_w, dense_b = fit(x[:, cols])
    assert np.abs(dense_w - got_w).max() > 10 * (1e-5 + 1e-4 * np.abs(want_w).max())

    def error(weight, bias):
        return float(((x_sliced @ weight.T + bias - y) ** 2).sum())

    assert error(got_w, got_b) < error(dense_w, dense_b)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_prune_save_load_round_trip_per_layer(make_tiny_model, tiny_tokenizer, tmp_path, tied):
    """prune_model (recovery biases on o_proj / down_proj, non-uniform shapes) -> save_pruned
    -> per-layer remote-code config; load_pruned and from_pretrained(trust_remote_code=True)
    give exactly the same tensors (the sliced q_norm / k_norm included), logits and greedy
    tokens; the plan's parameter count includes the sliced norms."""
    model = make_tiny_model("olmo2", num_heads=4, num_kv_heads=4, layers=3, tied=tied)
    calib = _tokens(model.config.vocab_size, n=6, length=24, seed=1)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, batch_size=3, progress=False))
    assert report["parameters"]["after"] == report["parameters"]["counted_after"] == count_parameters(model)
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes(model)
    assert len(set(shapes)) > 1
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slimllm_olmo2" and config["tie_word_embeddings"] is tied
    ids = _tokens(model.config.vocab_size, seed=5)
    expected = _logits(model, ids)
    prompt = ids[:1, :10]
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for back in (
        checkpoint.load_pruned(out),
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
    ):
        assert get_adapter(back).layer_shapes(back) == shapes
        for layer, shape in zip(get_adapter(back).layers(back), shapes, strict=True):
            attn = get_adapter(back).attention(layer)
            assert attn.q_norm.weight.shape == (shape.num_heads * HEAD_DIM,)
            assert attn.k_norm.weight.shape == (shape.num_kv_heads * HEAD_DIM,)
        assert back.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
        assert torch.equal(_logits(back, ids), expected)
        assert torch.equal(back.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)


def test_uniform_prune_without_recovery_saves_stock_config(make_tiny_model, tiny_tokenizer, tmp_path):
    """Equal ratios, no recovery: the stock Olmo2Config (pruned head counts, head_dim explicit)
    builds q_norm / k_norm of the sliced sizes, and plain from_pretrained reloads it exactly."""
    model = make_tiny_model("olmo2", num_heads=4, num_kv_heads=2, layers=3)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=2)
    model, report = prune_model(model, None, calib,
                                PruneConfig(layer_ratios=[0.4] * 3, recovery="none", progress=False))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "olmo2" and "auto_map" not in saved
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 2, HEAD_DIM)
    assert not (out / checkpoint.REMOTE_CODE_NAME).exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "Olmo2ForCausalLM"
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    ids = _tokens(model.config.vocab_size, seed=6)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def test_streamed_save_plans_the_sliced_norms(make_tiny_model, tiny_tokenizer, tmp_path):
    """A resumable prune decides the saved layout before any block changes: the streamed
    output (save_pruned_from_state) holds exactly the tensors save_pruned writes, sliced
    q_norm / k_norm (MHA: both) included."""
    from slimllm.io.streaming import save_pruned_from_state
    from slimllm.pruning.resume import PruneState

    model = make_tiny_model("olmo2", num_heads=4, num_kv_heads=4, layers=3)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=3)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False),
                                state_dir=tmp_path / "state")
    checkpoint.save_pruned(model, None, tmp_path / "ref", report)
    save_pruned_from_state(model, None, tmp_path / "got", report, PruneState.open(tmp_path / "state"))

    ref, got = folder_tensors(tmp_path / "ref"), folder_tensors(tmp_path / "got")
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert ref["model.layers.0.self_attn.k_norm.weight"].shape[0] < 4 * HEAD_DIM


def test_heads_not_divisible_by_kv_heads_is_a_config_error(make_tiny_model):
    """4 query heads over 3 KV heads: refused with a typed error before any weight changes."""
    model = make_tiny_model("olmo2", num_heads=4, num_kv_heads=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="layer 0: 4 query heads do not divide into 3 KV heads"):
        prune_model(model, None, _tokens(model.config.vocab_size, n=2, length=12),
                    PruneConfig(ratio=0.3, progress=False))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gguf_export_is_refused(make_tiny_model, tiny_tokenizer, tmp_path):
    """No GGUF for olmo2 (the exporter writes llama.cpp's llama / deci archs): a typed error
    naming the family and the exportable ones, nothing written."""
    model = make_tiny_model("olmo2")
    model, report = prune_model(model, None, _tokens(model.config.vocab_size, n=4, length=24),
                                PruneConfig(ratio=0.3, progress=False))
    folder = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", report)
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"GGUF export supports llama, mistral, qwen2, phi3, granite, not 'olmo2'"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert sorted(os.listdir(tmp_path)) == ["pruned"]
