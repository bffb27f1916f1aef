"""The block-by-block pipeline (slimllm.pruning.pipeline) on tiny random Llama / Mistral / Qwen2 / Qwen3
/ Granite / Gemma / Gemma 2 / Gemma 3 / Phi-3 / OLMo 2 models, MHA and GQA, tied and untied embeddings.

The central check rebuilds every pruned model independently, as a *masked* dense model: the
pruned heads' o_proj columns and the pruned channels' down_proj columns are zeroed, and the
recovery is fitted with numpy on materialised outputs (``np.polyfit`` per output coordinate for
the affine fit, a dense solve for ridge), layer after layer on the masked model's own
activations. The sliced model must give the same logits.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from width_norms import mask_width_norms
from slimllm.families.adapters import get_adapter
from slimllm.errors import (
    CalibrationError,
    ConfigError,
    NonFiniteError,
    UnsupportedArchitectureError,
)
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.ratios import count_parameters

CASES = [
    # arch, heads, kv heads, tied, head_dim
    ("llama", 4, 4, False, 16),  # MHA, untied
    ("llama", 4, 2, True, 16),  # GQA, tied
    ("mistral", 4, 2, False, 16),
    ("qwen2", 4, 2, True, 16),  # q/k/v biases
    ("qwen3", 4, 4, False, 16),  # MHA, q_norm / k_norm
    ("qwen3", 8, 2, True, 16),  # GQA with 4 query heads per group
    ("granite", 4, 2, False, 16),  # scalar multipliers
    ("gemma", 4, 4, True, 32),  # head_dim != hidden / heads, GeGLU, 1 + weight norms
    # sandwich norms, soft-capping, sliding-window layers, query_pre_attn_scalar
    ("gemma2", 4, 2, True, 32),
    ("gemma2", 4, 4, False, 32),
    ("gemma3_text", 4, 2, True, 32),  # + q_norm / k_norm of size head_dim
    ("gemma3_text", 8, 2, False, 32),
    # fused qkv_proj / gate_up_proj, per-layer config view, partial rotary factor 0.75
    ("phi3", 4, 4, True, 16),
    ("phi3", 8, 2, False, 16),
    # no input norms, post norms only; q_norm / k_norm over the whole q / k projections
    ("olmo2", 8, 2, False, 16),
    ("olmo2", 4, 4, True, 16),  # MHA: k_norm sliced with the KV heads too
]
#: ids name head_dim only where it is not the fixture's default 16
CASE_IDS = [f"{a}-{h}h{g}kv-{'tied' if t else 'untied'}{'' if d == 16 else f'-hd{d}'}" for a, h, g, t, d in CASES]


def _ids(vocab: int, n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _capture(model, module, ids):
    """Materialised input (tokens, features) of ``module`` over the calibration ids."""
    seen = []

    def hook(_m, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return torch.cat(seen).numpy()


def _fit(x, w, kept_cols, recovery, damp, x_kept=None):
    """Reference recovery from materialised inputs x (n, D_in) and weight w (d, D_in): returns
    the new dense-shaped weight (zero outside kept_cols) and bias (bias-free fit) that map the
    kept inputs to y = x W^T. The kept inputs are x[:, kept_cols], or ``x_kept`` (n, |K|) where
    pruning changes them (olmo2: the masked attention's o_proj inputs, see width_norms.py)."""
    d, D = w.shape
    xk = x[:, kept_cols] if x_kept is None else x_kept
    w_k = w[:, kept_cols]
    new_w = np.zeros_like(w)
    y_full = x @ w.T
    y_kept = xk @ w_k.T
    if recovery == "none":
        new_w[:, kept_cols] = w_k
        return new_w, np.zeros(d)
    if recovery == "affine":
        scale, bias = np.empty(d), np.empty(d)
        for j in range(d):
            scale[j], bias[j] = np.polyfit(y_kept[:, j], y_full[:, j], 1)
        new_w[:, kept_cols] = w_k * scale[:, None]
        return new_w, bias
    k = len(kept_cols)
    z = np.hstack([xk, x])
    mu = z.mean(0)
    zc = z - mu
    cov = zc.T @ zc / len(z)
    ckk = cov[:k, :k]
    lam = damp * np.mean(np.diag(ckk))
    cross = cov[:k, k:] @ w.T  # cov(x_K, y)
    mu_k, mu_y = mu[:k], w @ mu[k:]
    if recovery == "ridge-delta":  # shrink toward the kept weights: fit y - x_K W_K^T with x_K
        delta = np.linalg.solve(ckk + lam * np.eye(k), cross - ckk @ w_k.T).T
        new_w[:, kept_cols] = w_k + delta
        return new_w, mu_y - w_k @ mu_k - delta @ mu_k
    wt = np.linalg.solve(ckk + lam * np.eye(k), cross)
    new_w[:, kept_cols] = wt.T
    return new_w, mu_y - wt.T @ mu_k


def _held_out_damp(x, w, kept_cols, recovery, n_seq):
    """Brute force of ``ridge_damp="auto"``: every damp of the grid fitted on the rows of the
    sequences i % 4 != 3 of x (n_seq sequences, sequence-major rows), the one of least mean
    squared error ||x_K W'^T + b - x W^T||^2 on the held-out rows (i % 4 == 3)."""
    from slimllm.pruning.pipeline import HOLDOUT_EVERY, RIDGE_DAMP_GRID

    seq = np.repeat(np.arange(n_seq), len(x) // n_seq)
    held = seq % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    errors = []
    for damp in RIDGE_DAMP_GRID:
        new_w, bias = _fit(x[~held], w, kept_cols, recovery, damp)
        r = x[held] @ new_w.T + bias - x[held] @ w.T
        errors.append(float(np.mean(np.sum(r**2, axis=1))))
    best = int(np.argmin(errors))
    assert sorted(errors)[1] > errors[best] * (1 + 1e-6)  # a clear minimum, no near-tie
    return RIDGE_DAMP_GRID[best]


def _masked_reference(dense, report, ids, recovery, damp, chosen=None):
    """The dense model with pruned heads/channels zeroed and the recovery refitted in numpy.
    ``damp="auto"``: chosen per projection by :func:`_held_out_damp` (appended to ``chosen``).
    Families with norms over a whole projection (olmo2) get those norms masked to the kept
    heads (width_norms.py) and the o_proj fit maps the masked attention's kept inputs to the
    dense output of the layer's inputs."""
    ref = copy.deepcopy(dense)
    adapter = get_adapter(ref)
    for layer, entry in zip(adapter.layers(ref), report["layers"]):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        h = adapter.head_dim(layer)
        for linear, kept_cols in (
            (attn.o_proj, [c for a in entry["kept_heads"] for c in range(a * h, (a + 1) * h)]),
            (mlp.down_proj, entry["kept_channels"]),
        ):
            if len(kept_cols) == linear.in_features:
                continue
            x = _capture(ref, linear, ids)
            x_kept = None
            if linear is attn.o_proj and adapter.width_norms:
                mask_width_norms(adapter, attn, entry["kept_heads"], entry["kept_kv_heads"], h)
                x_kept = _capture(ref, linear, ids)[:, kept_cols]
            w = linear.weight.detach().double().numpy()
            lam = damp
            if damp == "auto":
                lam = _held_out_damp(x, w, np.asarray(kept_cols), recovery, len(ids))
                chosen.append(lam)
            new_w, bias = _fit(x, w, np.asarray(kept_cols), recovery, lam, x_kept)
            old_bias = linear.bias
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(new_w))
                if recovery != "none":
                    if old_bias is not None:
                        bias = bias + old_bias.detach().double().numpy()
                    linear.bias = torch.nn.Parameter(torch.from_numpy(bias).float())
    return ref


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ratio_zero_is_a_noop(make_tiny_model, case):
    arch, heads, kv, tied, head_dim = case
    model = make_tiny_model(arch, num_heads=heads, num_kv_heads=kv, tied=tied, head_dim=head_dim)
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = prune_model(model, None, ids, PruneConfig(ratio=0.0, progress=False))
    assert out is model
    assert torch.equal(_logits(model, ids), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert report["parameters"]["achieved_ratio"] == 0.0
    assert report["parameters"]["before"] == report["parameters"]["after"] == count_parameters(model)


@pytest.mark.parametrize("recovery", ["none", "affine", "ridge", "ridge-delta"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sliced_model_equals_masked_model(make_tiny_model, case, recovery):
    arch, heads, kv, tied, head_dim = case
    dense = make_tiny_model(arch, num_heads=heads, num_kv_heads=kv, tied=tied, layers=3, head_dim=head_dim)
    calib = _ids(dense.config.vocab_size, n=6, length=24, seed=1)
    model = copy.deepcopy(dense)
    config = PruneConfig(ratio=0.3, recovery=recovery, ridge_damp=0.05, batch_size=4, progress=False)
    model, report = prune_model(model, None, calib, config)
    # something was pruned in every layer, within the GQA constraints
    adapter = get_adapter(model)
    for layer, entry in zip(adapter.layers(model), report["layers"]):
        shape = adapter.layer_shape(layer)
        assert shape.num_heads == len(entry["kept_heads"]) == entry["num_heads"][1]
        assert shape.num_kv_heads == len(entry["kept_kv_heads"])
        assert shape.intermediate_size == len(entry["kept_channels"]) < 96
        assert shape.num_heads % shape.num_kv_heads == 0
    assert sum(e["heads_removed"] for e in report["layers"]) > 0
    ref = _masked_reference(dense, report, calib, recovery, damp=0.05)
    probe = _ids(dense.config.vocab_size, n=3, length=20, seed=7)
    got, want = _logits(model, probe), _logits(ref, probe)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the pruned model differs from the dense one, and generates
    assert not torch.allclose(got, _logits(dense, probe), atol=1e-3)
    out = model.generate(probe[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("recovery", ["ridge", "ridge-delta"])
def test_auto_damp_minimises_held_out_error(make_tiny_model, recovery):
    """ridge_damp="auto": each projection's damp is the grid value of least held-out error
    (brute force over the grid on materialised activations, layer after layer on the masked
    model), refitted on every sequence: the sliced model equals that masked model."""
    dense = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=3)
    calib = _ids(dense.config.vocab_size, n=10, length=24, seed=11)
    config = PruneConfig(ratio=0.3, recovery=recovery, ridge_damp="auto", batch_size=3,
                         progress=False)
    model, report = prune_model(copy.deepcopy(dense), None, calib, config)
    chosen: list = []
    ref = _masked_reference(dense, report, calib, recovery, "auto", chosen)
    recorded = [e[key] for e in report["layers"]
                for key in ("o_proj_ridge_damp", "down_proj_ridge_damp") if key in e]
    assert recorded == chosen and len(chosen) >= 4
    probe = _ids(dense.config.vocab_size, n=2, seed=9)
    torch.testing.assert_close(_logits(model, probe), _logits(ref, probe), rtol=1e-4, atol=2e-5)


def _block_io(model, layer_idx, ids):
    """Materialised (tokens, hidden) float64 input, MLP output and output of one block."""
    layer = get_adapter(model).layers(model)[layer_idx]
    seen = {}

    def pre(_m, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def mlp_out(_m, _args, out):
        seen["mlp"] = out.detach()

    def out(_m, _args, result):
        seen["y"] = (result[0] if isinstance(result, tuple) else result).detach()

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
               layer.mlp.register_forward_hook(mlp_out), layer.register_forward_hook(out)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "granite"])
def test_block_target_fits_dense_block_output(make_tiny_model, arch):
    """recovery_target="block" on layer 0 (dense inputs): the recovered down_proj (weight and
    bias) is the least-squares fit of (bf16 dense block output - h_mid) / m on the kept
    channels, h_mid the pruned block's output before the MLP (lstsq brute force, damp ~0), and
    its block error is below that of the projection target."""
    dense = make_tiny_model(arch, num_heads=4, num_kv_heads=2, layers=2)
    m = getattr(dense.config, "residual_multiplier", 1.0)  # granite's tiny config: 0.5
    calib = _ids(dense.config.vocab_size, n=10, length=24, seed=4)
    errors = {}
    for target in ("block", "projection"):
        config = PruneConfig(layer_ratios=(0.4, 0.0), recovery="ridge", ridge_damp=1e-9,
                             recovery_target=target, batch_size=3, progress=False)
        model, report = prune_model(copy.deepcopy(dense), None, calib, config)
        assert report["layers"][0]["channels_removed"] > 0
        ref = _block_io(dense, 0, calib)["y"].float().bfloat16().double()
        got = _block_io(model, 0, calib)
        errors[target] = float(((got["y"] - ref) ** 2).sum())
        if target == "block":
            h_mid = got["y"] - m * got["mlp"]
            down = model.model.layers[0].mlp.down_proj
            a = _capture(model, down, calib)
            design = np.hstack([a, np.ones((len(a), 1))])
            sol = np.linalg.lstsq(design, ((ref - h_mid) / m).numpy(), rcond=None)[0]
            np.testing.assert_allclose(down.weight.detach().double().numpy(), sol[:-1].T,
                                       rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(down.bias.detach().double().numpy(), sol[-1],
                                       rtol=1e-3, atol=1e-4)
    assert errors["block"] < errors["projection"]


def test_block_target_needs_ridge():
    with pytest.raises(ConfigError, match='recovery_target="block" needs a ridge recovery'):
        PruneConfig(ratio=0.2, recovery="affine", recovery_target="block")
    with pytest.raises(ConfigError, match="recovery_target must be one of projection, block"):
        PruneConfig(ratio=0.2, recovery_target="dense")


def test_auto_damp_needs_held_out_sequences(make_tiny_model):
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="at least 4 sequences, got 3"):
        prune_model(model, None, _ids(model.config.vocab_size, n=3),
                    PruneConfig(ratio=0.2, recovery="ridge-delta", ridge_damp="auto",
                                progress=False))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_kv_group_mode_equals_masked_model(make_tiny_model):
    dense = make_tiny_model("llama", num_heads=8, num_kv_heads=4, layers=2)
    calib = _ids(dense.config.vocab_size, seed=2)
    config = PruneConfig(ratio=0.3, head_mode="kv-group", recovery="affine", batch_size=3,
                         progress=False)
    model, report = prune_model(copy.deepcopy(dense), None, calib, config)
    for entry in report["layers"]:
        if entry["heads_removed"]:
            assert entry["kv_heads_removed"] * 2 == entry["heads_removed"]
            kept_groups = {a // 2 for a in entry["kept_heads"]}
            assert sorted(kept_groups) == entry["kept_kv_heads"]
    assert any(e["kv_heads_removed"] for e in report["layers"])
    ref = _masked_reference(dense, report, calib, "affine", 0.0)
    probe = _ids(dense.config.vocab_size, n=2, seed=9)
    torch.testing.assert_close(_logits(model, probe), _logits(ref, probe), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("arch, kv, head_dim", [("llama", 2, 16), ("gemma2", 4, 32), ("gemma3_text", 4, 32)])
def test_affine_o_proj_fit_equals_polyfit(make_tiny_model, arch, kv, head_dim):
    """Layer 0 sees the dense inputs: its recovered o_proj must be the per-coordinate
    np.polyfit of the full output on the kept-heads output, on materialised activations.
    Gemma 2/3 normalise that output (post_attention_layernorm) before the residual add: the
    fit is still on o_proj's own output, the last linear map of the attention branch."""
    dense = make_tiny_model(arch, num_heads=4, num_kv_heads=kv, layers=2, head_dim=head_dim)
    calib = _ids(dense.config.vocab_size, n=5, length=20, seed=3)
    model, report = prune_model(copy.deepcopy(dense), None, calib,
                                PruneConfig(ratio=0.3, recovery="affine", batch_size=2,
                                            progress=False))
    entry = report["layers"][0]
    assert entry["heads_removed"] > 0
    o_dense = dense.model.layers[0].self_attn.o_proj
    x = _capture(dense, o_dense, calib)
    w = o_dense.weight.detach().double().numpy()
    cols = [c for a in entry["kept_heads"] for c in range(a * head_dim, (a + 1) * head_dim)]
    y_full, y_kept = x @ w.T, x[:, cols] @ w[:, cols].T
    fits = np.array([np.polyfit(y_kept[:, j], y_full[:, j], 1) for j in range(w.shape[0])])
    o_pruned = model.model.layers[0].self_attn.o_proj
    np.testing.assert_allclose(o_pruned.weight.detach().double().numpy(),
                               w[:, cols] * fits[:, :1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(o_pruned.bias.detach().double().numpy(), fits[:, 1],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", [0.1, 0.25, 0.4])
def test_achieved_ratio_and_exact_counts(make_tiny_model, target):
    model = make_tiny_model("qwen2", num_heads=8, num_kv_heads=8, layers=4, intermediate=256)
    before = count_parameters(model)
    calib = _ids(model.config.vocab_size, seed=4)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=target, progress=False))
    p = report["parameters"]
    assert p["before"] == before
    assert p["after"] == p["counted_after"] == count_parameters(model)
    assert p["achieved_ratio"] == (before - count_parameters(model)) / before
    # the tiny model's steps are coarse (one head = 2.6% of it); SmolLM2's are fine (e2e test)
    assert abs(p["achieved_ratio"] - target) < 0.015


def test_report_contents(make_tiny_model, tiny_tokenizer):
    from slimllm.pruning.calibration import from_documents

    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=3)
    text = "Pruning removes attention heads and channels of a language model. " * 40
    calib = from_documents(tiny_tokenizer, [text], num_samples=4, seq_len=16, seed=5)
    config = PruneConfig(ratio=0.25, pruned_layers=2, batch_size=3, progress=False)
    model, report = prune_model(model, tiny_tokenizer, calib, config)
    json.dumps(report)
    assert report["architecture"] == "llama" and report["num_layers"] == 3
    assert report["calibration"]["num_samples"] == 4 and report["calibration"]["seq_len"] == 16
    assert report["calibration"]["seed"] == 5 and report["calibration"]["mode"] == "stream"
    assert report["config"]["ratio"] == 0.25 and report["config"]["pruned_layers"] == 2
    assert report["parameters"]["target_ratio"] == 0.25
    for key in ("forward", "statistics", "ranking", "greedy", "regression", "slicing", "total"):
        assert report["timings"][key] >= 0
    layers = report["layers"]
    importance = [e["importance"] for e in layers]
    assert all(-1 <= s <= 1 for s in importance)
    untouched = [e for e in layers if e["ratio"] == 0]
    assert len(untouched) == 1 and untouched[0]["importance"] == min(importance)
    assert untouched[0]["heads_removed"] == untouched[0]["channels_removed"] == 0
    for e in layers:
        for key in ("index", "ratio", "clamped", "kept_heads", "kept_kv_heads", "kept_channels",
                    "layer_cosine", "cos_vs_dense_output", "num_heads", "intermediate_size"):
            assert key in e
        if e["heads_removed"]:
            assert e["head_objective"] >= e["head_objective_initial"] - 1e-9
            assert e["head_swaps"] >= 0
    first_pruned = min(e["index"] for e in layers if e["ratio"] > 0)
    for e in layers:
        assert e["cos_vs_dense_output"] <= 1.0 + 1e-6
        if e["index"] < first_pruned:  # nothing pruned yet: the dense hidden states
            assert e["cos_vs_dense_output"] > 0.999


def test_greedy_flag_and_protect_lowest(make_tiny_model):
    dense = make_tiny_model("llama", num_heads=8, num_kv_heads=2, layers=2)
    calib = _ids(dense.config.vocab_size, seed=6)
    _, plain = prune_model(copy.deepcopy(dense), None, calib,
                           PruneConfig(ratio=0.3, greedy=False, protect_lowest=0.0, progress=False))
    for e in plain["layers"]:
        if e["heads_removed"]:
            assert e["head_swaps"] == 0 and e["head_objective"] == e["head_objective_initial"]


def test_unsorted_batches_and_dicts_are_accepted(make_tiny_model):
    dense = make_tiny_model("mistral", num_heads=4, num_kv_heads=2)
    calib = _ids(dense.config.vocab_size, n=6)
    cfg = PruneConfig(ratio=0.2, batch_size=6, progress=False)
    a, ra = prune_model(copy.deepcopy(dense), None, calib, cfg)
    b, rb = prune_model(copy.deepcopy(dense), None, [{"input_ids": calib[:2]}, calib[2:]], cfg)
    assert ra["layers"] == rb["layers"] or all(
        x["kept_channels"] == y["kept_channels"] for x, y in zip(ra["layers"], rb["layers"])
    )
    probe = _ids(dense.config.vocab_size, n=2, seed=3)
    torch.testing.assert_close(_logits(a, probe), _logits(b, probe), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
        (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
        (dict(ratio=float("nan")), "ratio must be finite"),
        (dict(), "exactly one of ratio"),
        (dict(ratio=0.2, layer_ratios=[0.1, 0.1]), "exactly one of ratio"),
        (dict(layer_ratios=[0.1, 1.2]), r"layer_ratios\[1\] must be in \[0, 1\)"),
        (dict(ratio=0.2, head_mode="groups"), "head_mode must be one of"),
        (dict(ratio=0.2, recovery="lsq"), "recovery must be one of"),
        (dict(ratio=0.2, ridge_damp=-1.0), "ridge_damp must be >= 0"),
        (dict(ratio=0.2, protect_lowest=1.0), r"protect_lowest must be in \[0, 1\)"),
        (dict(ratio=0.2, channel_multiple=0), "channel_multiple must be an integer >= 1"),
        (dict(ratio=0.2, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(ratio=0.2, pruned_layers=0), "pruned_layers must be an integer >= 1"),
        (dict(ratio=0.2, device="tpu"), "device"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(progress=False, **kwargs)


def test_cuda_unavailable_is_a_config_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        PruneConfig(ratio=0.2, device="cuda")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(
        torch.equal(now[k], state[k]) or (now[k].isnan() == state[k].isnan()).all() for k in state
    )


def test_layer_that_would_keep_no_heads(make_tiny_model):
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2)
    state = _state(model)
    with pytest.raises(ConfigError, match="layer 1: ratio 0.9 would remove 2 of 2 query heads per KV group"):
        prune_model(model, None, _ids(model.config.vocab_size),
                    PruneConfig(layer_ratios=[0.1, 0.9], progress=False))
    assert _unchanged(model, state)
    with pytest.raises(ConfigError, match="cannot remove"):
        prune_model(model, None, _ids(model.config.vocab_size),
                    PruneConfig(ratio=0.6, pruned_layers=1, progress=False))
    assert _unchanged(model, state)
    with pytest.raises(ConfigError, match="3 entries for a model of 2 layers"):
        prune_model(model, None, _ids(model.config.vocab_size),
                    PruneConfig(layer_ratios=[0.1, 0.1, 0.1], progress=False))


def test_nan_activations_are_caught_before_any_change(make_tiny_model):
    model = make_tiny_model("qwen2", num_heads=4, num_kv_heads=2, layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    state = _state(model)
    with pytest.raises(NonFiniteError, match="layer 1: non-finite values"):
        prune_model(model, None, _ids(model.config.vocab_size), PruneConfig(ratio=0.2, progress=False))
    assert _unchanged(model, state)


def _half_model_with_large_activations(make_tiny_model, v_scale=2000.0):
    """A 1-layer float16 Llama whose o_proj inputs (|x| up to ~900) and down_proj inputs (up to
    ~8000) are finite in float16 but whose squares are not (> 65504)."""
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=1)
    with torch.no_grad():
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        attn.v_proj.weight.mul_(v_scale)
        mlp.gate_proj.weight.mul_(30.0)
        mlp.up_proj.weight.mul_(2000.0)
    return model.half()


def _activations(model, ids):
    """float16 o_proj input, MLP input, down_proj input and output of layer 0 (tokens, dim)."""
    layer = model.model.layers[0]
    seen = {}

    def keep(name, tensor):
        seen[name] = tensor.detach().reshape(-1, tensor.shape[-1])

    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: keep("o_in", a[0])),
        layer.mlp.register_forward_pre_hook(lambda _m, a: keep("x_in", a[0])),
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: keep("act", a[0])),
        layer.mlp.down_proj.register_forward_hook(lambda _m, _a, out: keep("y", out)),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_float16_activations_whose_squares_overflow_stay_exact_in_float64(make_tiny_model):
    """Issue 4 item 3: statistics of float16 activations are accumulated in float64, so a
    float16 model whose activations square past float16's range prunes exactly like the
    float64 brute force on the same float16 activations (heads, o_proj fit, channels)."""
    import bruteforce as bf

    dense = _half_model_with_large_activations(make_tiny_model)
    ids = _ids(dense.config.vocab_size, n=4, length=32)
    acts = _activations(dense, ids)
    for name in ("o_in", "act"):  # the premise: finite in float16, squares are not
        x = acts[name]
        assert x.dtype == torch.float16 and torch.isfinite(x).all()
        assert torch.isinf(x * x).any() and torch.isinf((x * x).sum(0)).any()

    config = PruneConfig(layer_ratios=[0.5], recovery="affine", batch_size=4, progress=False)
    model, report = prune_model(copy.deepcopy(dense), None, ids, config)
    entry = report["layers"][0]
    assert entry["heads_removed"] == 2 and entry["channels_removed"] == 48
    assert np.isfinite([entry["head_objective"], entry["layer_cosine"]]).all()

    # heads and the affine o_proj fit: brute force on the dense float16 o_proj inputs
    o_proj = dense.model.layers[0].self_attn.o_proj
    x = acts["o_in"].double().numpy()
    w_o = o_proj.weight.detach().double().numpy()
    sel, _ = bf.select_heads(bf.head_outputs(x, w_o, 4), 2, 2, "uniform", greedy=True)
    assert entry["kept_heads"] == sel.kept
    cols = [c for a in sel.kept for c in range(a * 16, (a + 1) * 16)]
    scale, bias = bf.affine_fit(x[:, cols] @ w_o[:, cols].T, x @ w_o.T)
    got_o = model.model.layers[0].self_attn.o_proj
    torch.testing.assert_close(got_o.weight, torch.from_numpy(w_o[:, cols] * scale[:, None]).half(),
                               rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got_o.bias.double(), torch.from_numpy(bias),
                               rtol=1e-2, atol=1e-2 * float(np.abs(bias).max()))

    # channels: brute force on the MLP activations seen with the pruned attention
    probe = copy.deepcopy(dense)
    probe.model.layers[0].self_attn = copy.deepcopy(model.model.layers[0].self_attn)
    acts = _activations(probe, ids)
    mlp = dense.model.layers[0].mlp
    m = bf.Mlp(*(acts[k].double().numpy() for k in ("x_in", "act", "y")),
               *(lin.weight.detach().double().numpy()
                 for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)))
    pruned = bf.select_channels(sum(bf.channel_scores(m)), 48, 0.01)
    assert entry["kept_channels"] == sorted(set(range(96)) - set(pruned.tolist()))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_float16_activations_that_overflow_are_caught_before_any_change(make_tiny_model):
    """Activations past float16's range (inf in the forward itself) are a NonFiniteError
    naming the layer, raised in the dense pass: no weight changes."""
    model = _half_model_with_large_activations(make_tiny_model, v_scale=3e5)
    state = _state(model)
    with pytest.raises(NonFiniteError, match="layer 0: non-finite values"):
        prune_model(model, None, _ids(model.config.vocab_size, n=4, length=32),
                    PruneConfig(ratio=0.2, progress=False))
    assert _unchanged(model, state)


def test_bad_calibration_batches(make_tiny_model):
    model = make_tiny_model("llama")
    cfg = PruneConfig(ratio=0.2, progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        prune_model(model, None, [], cfg)
    with pytest.raises(CalibrationError, match="token ids must be in"):
        prune_model(model, None, torch.full((2, 8), 10_000), cfg)
    with pytest.raises(CalibrationError, match="integer token ids"):
        prune_model(model, None, torch.zeros(2, 8), cfg)


def test_unsupported_architecture():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        prune_model(model, None, torch.zeros(1, 8, dtype=torch.long),
                    PruneConfig(ratio=0.2, progress=False))


# ------------------------------------------------------------------------------------------ CLI

REPO = Path(__file__).resolve().parent.parent


def _save_tiny(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _calib_text(path, repeats=60):
    path.write_text(
        "Pruning removes attention heads and intermediate channels of a language model. "
        "A calibration set of a few sequences estimates the statistics. " * repeats,
        encoding="utf-8",
    )
    return path


def _cli(*args):
    """Run the installed package's CLI (the same interpreter as the tests)."""
    return subprocess.run([sys.executable, "-m", "slimllm", "prune", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.parametrize("arch, head_dim", [("qwen3", 16), ("gemma2", 32)])
def test_cli_round_trip(make_tiny_model, tiny_tokenizer, tmp_path, arch, head_dim):
    """python -m slimllm prune on a saved tiny model; the folder reloads with the logits of the
    same prune done in memory, and the recovery biases survive."""
    from slimllm.pruning.calibration import load_calibration
    from slimllm.io.checkpoint import load_pruned

    dense = make_tiny_model(arch, num_heads=4, num_kv_heads=2, tied=True, layers=2, head_dim=head_dim)
    src = _save_tiny(dense, tiny_tokenizer, tmp_path / "dense")
    calib_file = _calib_text(tmp_path / "calib.txt")
    out = tmp_path / "pruned"
    run = _cli("--model", src, "--output", out, "--ratio", 0.25, "--calib-file", calib_file,
               "--num-samples", 4, "--seq-len", 32, "--batch-size", 2, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "achieved ratio" in run.stdout
    report = json.loads((out / "slimllm_report.json").read_text())
    assert report["calibration"]["source"] == str(calib_file)
    assert report["timings"]["saving"] >= 0
    reloaded = load_pruned(out)

    calib = load_calibration(tiny_tokenizer, calib_file, num_samples=4, seq_len=32, seed=0)
    model, mem_report = prune_model(copy.deepcopy(dense), tiny_tokenizer, calib,
                                    PruneConfig(ratio=0.25, batch_size=2, progress=False))
    assert [e["kept_channels"] for e in mem_report["layers"]] == [
        e["kept_channels"] for e in report["layers"]
    ]
    probe = _ids(dense.config.vocab_size, n=2, seed=11)
    torch.testing.assert_close(_logits(reloaded, probe), _logits(model, probe), rtol=1e-5, atol=1e-6)
    pruned = next(i for i, e in enumerate(report["layers"]) if e["heads_removed"])
    assert reloaded.model.layers[pruned].self_attn.o_proj.bias is not None
    assert count_parameters(reloaded) == report["parameters"]["counted_after"]


def test_cli_default_number_of_calibration_sequences(make_tiny_model, tiny_tokenizer, tmp_path):
    """Without --num-samples: 128 sequences from a calibration file (the windows load_calibration
    draws by default), 128 when self-calibrating, sampled 32 at a time (issue 14)."""
    from slimllm.pruning.calibration import FILE_SAMPLES, SELF_BATCH, SELF_SAMPLES, load_calibration

    assert (FILE_SAMPLES, SELF_SAMPLES, SELF_BATCH) == (128, 128, 32)
    dense = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2)
    src = _save_tiny(dense, tiny_tokenizer, tmp_path / "dense")
    calib_file = _calib_text(tmp_path / "calib.txt", repeats=200)
    common = ("--model", src, "--ratio", 0.2, "--seq-len", 8, "--batch-size", 32, "--no-progress")
    from_file = _cli(*common, "--output", tmp_path / "file", "--calib-file", calib_file)
    assert from_file.returncode == 0, from_file.stderr
    report = json.loads((tmp_path / "file" / "slimllm_report.json").read_text())
    assert report["calibration"]["num_samples"] == 128
    drawn = load_calibration(tiny_tokenizer, calib_file, seq_len=8).description
    assert drawn.items() <= report["calibration"].items() and report["calibration"]["tokens"] == 128 * 8
    self_run = _cli(*common, "--output", tmp_path / "self")
    assert self_run.returncode == 0, self_run.stderr
    report = json.loads((tmp_path / "self" / "slimllm_report.json").read_text())
    assert report["calibration"]["kind"] == "self" and report["calibration"]["num_samples"] == 128
    assert report["calibration"]["batch_size"] == 32


def test_cli_without_calibration_data_self_calibrates(make_tiny_model, tiny_tokenizer, tmp_path):
    """No calibration source: the sequences are sampled from the model (issue 4, item 1), and
    the result equals an in-memory prune on the same self-generated sequences."""
    from slimllm.pruning.calibration import self_generated
    from slimllm.io.checkpoint import load_pruned

    dense = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2)
    src = _save_tiny(dense, tiny_tokenizer, tmp_path / "dense")
    out = tmp_path / "pruned"
    run = _cli("--model", src, "--output", out, "--ratio", 0.2, "--num-samples", 4,
               "--seq-len", 16, "--batch-size", 2, "--calib-batch-size", 3, "--seed", 3,
               "--no-progress")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "slimllm_report.json").read_text())
    assert report["calibration"]["kind"] == "self" and report["calibration"]["seed"] == 3
    assert report["calibration"]["batch_size"] == 3
    calib = self_generated(dense, tiny_tokenizer, 4, 16, 3, batch_size=3)
    model, _ = prune_model(copy.deepcopy(dense), tiny_tokenizer, calib,
                           PruneConfig(ratio=0.2, batch_size=2, progress=False))
    probe = _ids(dense.config.vocab_size, n=2, seed=11)
    torch.testing.assert_close(_logits(load_pruned(out), probe), _logits(model, probe),
                               rtol=1e-5, atol=1e-6)
    explicit = _cli("--model", src, "--output", tmp_path / "explicit", "--calib", "self",
                    "--ratio", 0.2, "--num-samples", 4, "--seq-len", 16, "--batch-size", 2,
                    "--calib-batch-size", 3, "--seed", 3, "--no-progress")
    assert explicit.returncode == 0, explicit.stderr
    assert torch.equal(_logits(load_pruned(tmp_path / "explicit"), probe),
                       _logits(load_pruned(out), probe))
    both = _cli("--model", src, "--output", tmp_path / "x", "--ratio", 0.2, "--calib", "self",
                "--calib-file", src / "config.json")
    assert both.returncode == 2 and "one calibration source" in both.stderr
    zero = _cli("--model", src, "--output", tmp_path / "zero", "--ratio", 0.2,
                "--calib-batch-size", 0)
    assert zero.returncode == 2 and "--calib-batch-size must be positive" in zero.stderr
    assert not (tmp_path / "zero").exists()


def test_cli_ridge_damp_auto(make_tiny_model, tiny_tokenizer, tmp_path):
    """--ridge-damp auto reaches the pipeline (each recovered projection records the grid value
    it chose, as the in-memory prune does); a damp that is neither a number nor 'auto' exits 2
    before anything is written."""
    from slimllm.pruning.calibration import self_generated
    from slimllm.pruning.pipeline import RIDGE_DAMP_GRID

    dense = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2)
    src = _save_tiny(dense, tiny_tokenizer, tmp_path / "dense")
    out = tmp_path / "pruned"
    args = ("--model", src, "--ratio", 0.25, "--num-samples", 8, "--seq-len", 16,
            "--batch-size", 4, "--seed", 1, "--recovery", "ridge-delta", "--no-progress")
    run = _cli(*args, "--output", out, "--ridge-damp", "auto")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "slimllm_report.json").read_text())
    damps = [e[k] for e in report["layers"] for k in ("o_proj_ridge_damp", "down_proj_ridge_damp")
             if k in e]
    calib = self_generated(dense, tiny_tokenizer, 8, 16, 1)
    _, mem = prune_model(copy.deepcopy(dense), tiny_tokenizer, calib,
                         PruneConfig(ratio=0.25, batch_size=4, recovery="ridge-delta",
                                     ridge_damp="auto", progress=False))
    assert damps == [e[k] for e in mem["layers"] for k in ("o_proj_ridge_damp",
                                                           "down_proj_ridge_damp") if k in e]
    assert len(damps) >= 2 and set(damps) <= set(RIDGE_DAMP_GRID)
    bad = _cli(*args, "--output", tmp_path / "bad", "--ridge-damp", "high")
    assert bad.returncode == 2 and "expected a number or 'auto', got 'high'" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arch", ["llama", "granite"])
def test_save_load_round_trip_is_exact(make_tiny_model, tmp_path, arch):
    from slimllm.io.checkpoint import load_pruned, save_pruned

    model = make_tiny_model(arch, num_heads=4, num_kv_heads=2, layers=2)
    calib = _ids(model.config.vocab_size)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.2, progress=False))
    save_pruned(model, None, tmp_path / "out", report)
    back = load_pruned(tmp_path / "out")
    probe = _ids(model.config.vocab_size, n=2, seed=5)
    assert torch.equal(_logits(back, probe), _logits(model, probe))
    if arch == "granite":  # the scalar multipliers survive the round trip
        for key, value in {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                           "attention_multiplier": 0.2, "logits_scaling": 2.5}.items():
            assert getattr(back.config, key) == value


@pytest.mark.parametrize(
    "extra, error",
    [
        (["--ratio", "1.0"], "ConfigError"),
        (["--ratio", "-0.5"], "ConfigError"),
        (["--layer-ratios", "0.1,0.9"], "ConfigError: layer 1"),
        (["--ratio", "0.2", "--num-samples", "64", "--seq-len", "256"], "CalibrationError"),
    ],
)
def test_cli_bad_input_leaves_no_output(make_tiny_model, tiny_tokenizer, tmp_path, extra, error):
    src = _save_tiny(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "dense")
    calib_file = _calib_text(tmp_path / "calib.txt", repeats=3)
    out = tmp_path / "pruned"
    # 4 sequences: the default ridge_damp="auto" holds out every 4th one
    args = ["--model", src, "--output", out, "--calib-file", calib_file, "--num-samples", 4,
            "--seq-len", 16, "--no-progress", *extra]
    run = _cli(*args)
    assert run.returncode == 2, run.stderr
    assert error in run.stderr
    if error == "CalibrationError":
        assert "tokens found" in run.stderr and "16384 needed (64 x 256)" in run.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".pruned*"))


def test_cli_nan_and_unsupported_leave_no_output(make_tiny_model, tiny_tokenizer, tmp_path):
    import transformers

    from slimllm.cli import main

    calib_file = _calib_text(tmp_path / "calib.txt")
    model = make_tiny_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.fill_(float("nan"))
    src = _save_tiny(model, tiny_tokenizer, tmp_path / "nan")
    out = tmp_path / "out"
    common = ["--output", str(out), "--ratio", "0.2", "--calib-file", str(calib_file),
              "--num-samples", "2", "--seq-len", "16", "--no-progress"]
    assert main(["prune", "--model", str(src), *common]) == 2
    assert not out.exists()

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))
    )
    src = _save_tiny(gpt2, tiny_tokenizer, tmp_path / "gpt2")
    assert main(["prune", "--model", str(src), *common]) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) and not list(tmp_path.glob(".out*"))


def test_cli_help_documents_every_option():
    run = subprocess.run([sys.executable, "-m", "slimllm", "prune", "--help"], capture_output=True,
                         text=True, cwd=REPO)
    assert run.returncode == 0
    for option in ("--model", "--output", "--resume", "--dtype", "--device", "--ratio", "--layer-ratios",
                   "--pruned-layers", "--alpha", "--head-mode", "--no-greedy", "--recovery",
                   "--ridge-damp", "--protect-lowest", "--channel-multiple", "--calib-file",
                   "--calib-dataset", "--num-samples", "--seq-len", "--seed", "--batch-size"):
        assert option in run.stdout
    assert "keeps at least one query head per KV" in run.stdout
