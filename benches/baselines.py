"""Structured-pruning baselines for the benchmarks (bench-only code, not part of the package).

Every baseline removes the same kind of structures as slimllm -- query heads (the same number
from every KV group, transformers' GQA constraint) and SwiGLU MLP channels -- with the same
per-layer counts slimllm would use for *uniform* per-layer ratios
(:func:`slimllm.pruning.ratios.plan_for_target` with equal layer importances), and applies them with
:mod:`slimllm.pruning.slicing` so the result is a real, smaller model. Only the ranking differs:

``magnitude`` (magnitude-sp)
    head a: L2 norm of its weights, ``||W_q[rows_a]||^2 + ||W_o[:, cols_a]||^2`` plus the
    K/V rows of its KV group (shared by the group, so they do not change the choice inside a
    group); channel c: L2 norm of ``W_gate[c]``, ``W_up[c]``, ``W_down[:, c]``. No data.
``wanda`` (Wanda-sp, as in An et al.'s FLAP paper)
    ``|W_ij| * ||X_j||_2`` summed over every weight of a structure, ``X_j`` the calibration
    inputs of that projection: attention input for q/k/v, o_proj input for o, MLP input for
    gate/up, down_proj input for down.
``flap`` (FLAP, fluctuation metric, uniform per-layer structure, bias compensation)
    input channel j of o_proj / down_proj: ``var(X_j) * ||W[:, j]||^2``, summed per head
    (its head_dim columns) / per channel; after pruning, the pruned inputs' mean contribution
    goes into the bias: ``b += W[:, pruned] @ mean(X[pruned])`` (o_proj and down_proj get a
    bias, counted in the parameter total).

Activation statistics come from one dense forward of the calibration set through the whole
model (hooks on the four projections, no LM head), not from a sequential pass over pruned
blocks: simple, and the same statistics serve both ratios.

Torch-Pruning (``pip install torch-pruning``): :func:`torch_pruning_status` tries its own LLM
recipe at run time and the quality bench reports the outcome; see benches/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from slimllm.pruning import slicing
from slimllm.families.adapters import get_adapter
from slimllm.pruning.ratios import count_parameters, layer_specs, plan_for_target

METHODS = ("magnitude", "wanda", "flap")
#: methods that need calibration activations
NEEDS_STATS = ("wanda", "flap")
#: methods that add o_proj / down_proj biases (counted by the parameter plan)
ADDS_BIAS = ("flap",)


# ------------------------------------------------------------------------------ statistics


@dataclass
class LayerStats:
    """Streaming float64 sums over the calibration tokens of one decoder layer.

    ``attn_in_sq`` (d): sum of squares of the attention input (q/k/v input);
    ``o_in_sum`` / ``o_in_sq`` (D): sum / sum of squares of the o_proj input;
    ``mlp_in_sq`` (d): of the MLP input (gate/up input);
    ``down_in_sum`` / ``down_in_sq`` (F): of the down_proj input act(gate x) * up x.
    """

    n: int
    attn_in_sq: torch.Tensor
    o_in_sum: torch.Tensor
    o_in_sq: torch.Tensor
    mlp_in_sq: torch.Tensor
    down_in_sum: torch.Tensor
    down_in_sq: torch.Tensor

    @staticmethod
    def norm(sq: torch.Tensor) -> torch.Tensor:
        """||X_j||_2 over tokens."""
        return sq.clamp_min(0).sqrt()

    def mean(self, s: torch.Tensor) -> torch.Tensor:
        return s / self.n

    def var(self, s: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        m = s / self.n
        return (sq / self.n - m * m).clamp_min(0)


def _as_ids(calibration) -> torch.Tensor:
    ids = getattr(calibration, "input_ids", calibration)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("calibration must be a CalibrationSet or an (N, L) LongTensor")
    return ids.long()


@torch.no_grad()
def collect_stats(model, calibration, batch_size: int = 8) -> list[LayerStats]:
    """One dense forward of the calibration set (N x L tokens) through the decoder stack (no LM
    head); per-layer input statistics of q_proj, o_proj, gate_proj and down_proj."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ids = _as_ids(calibration)
    dev = next(model.parameters()).device
    stats: list[dict] = []
    handles = []

    def acc(entry: dict, key_sum: str | None, key_sq: str, count: bool):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if count:
                entry["n"] += x.shape[0]
            entry[key_sq] += (x * x).sum(0).cpu()
            if key_sum is not None:
                entry[key_sum] += x.sum(0).cpu()

        return hook

    for layer in layers:
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        d = attn.q_proj.in_features
        D = attn.o_proj.in_features
        F = mlp.down_proj.in_features
        z = lambda k: torch.zeros(k, dtype=torch.float64)  # noqa: E731
        e = {
            "n": 0,
            "attn_in_sq": z(d),
            "o_in_sum": z(D),
            "o_in_sq": z(D),
            "mlp_in_sq": z(d),
            "down_in_sum": z(F),
            "down_in_sq": z(F),
        }
        stats.append(e)
        handles += [
            attn.q_proj.register_forward_pre_hook(acc(e, None, "attn_in_sq", True)),
            attn.o_proj.register_forward_pre_hook(acc(e, "o_in_sum", "o_in_sq", False)),
            mlp.gate_proj.register_forward_pre_hook(acc(e, None, "mlp_in_sq", False)),
            mlp.down_proj.register_forward_pre_hook(acc(e, "down_in_sum", "down_in_sq", False)),
        ]
    was_training = model.training
    model.eval()
    try:
        base = adapter.base_model(model)
        for chunk in ids.split(batch_size):
            base(input_ids=chunk.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [LayerStats(**e) for e in stats]


# ------------------------------------------------------------------------------ scores


def _head_sum(per_column: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(H*h,) per-column values -> (H,) per-head sums."""
    return per_column.reshape(num_heads, -1).sum(1)


def head_scores(method: str, adapter, layer, st: LayerStats | None) -> torch.Tensor:
    """Importance of every query head of ``layer`` (high = keep), float64 (H,)."""
    attn = adapter.attention(layer)
    shape = adapter.layer_shape(layer)
    H, G = shape.num_heads, shape.num_kv_heads
    g = H // G
    Wq = attn.q_proj.weight.detach().double().cpu()
    Wk = attn.k_proj.weight.detach().double().cpu()
    Wv = attn.v_proj.weight.detach().double().cpu()
    Wo = attn.o_proj.weight.detach().double().cpu()
    if method == "magnitude":
        q = _head_sum((Wq * Wq).sum(1), H)
        o = _head_sum((Wo * Wo).sum(0), H)
        kv = _head_sum((Wk * Wk).sum(1) + (Wv * Wv).sum(1), G).repeat_interleave(g)
        return (q + o + kv).sqrt()
    if method == "wanda":
        xin = LayerStats.norm(st.attn_in_sq)[None, :]
        xo = LayerStats.norm(st.o_in_sq)[None, :]
        q = _head_sum((Wq.abs() * xin).sum(1), H)
        o = _head_sum((Wo.abs() * xo).sum(0), H)
        kv = _head_sum((Wk.abs() * xin).sum(1) + (Wv.abs() * xin).sum(1), G).repeat_interleave(g)
        return q + o + kv
    if method == "flap":
        fluct = st.var(st.o_in_sum, st.o_in_sq) * (Wo * Wo).sum(0)
        return _head_sum(fluct, H)
    raise ValueError(f"unknown baseline {method!r}")


def channel_scores(method: str, adapter, layer, st: LayerStats | None) -> torch.Tensor:
    """Importance of every MLP channel of ``layer`` (high = keep), float64 (F,)."""
    mlp = adapter.mlp(layer)
    Wg = mlp.gate_proj.weight.detach().double().cpu()
    Wu = mlp.up_proj.weight.detach().double().cpu()
    Wd = mlp.down_proj.weight.detach().double().cpu()
    if method == "magnitude":
        return ((Wg * Wg).sum(1) + (Wu * Wu).sum(1) + (Wd * Wd).sum(0)).sqrt()
    if method == "wanda":
        xin = LayerStats.norm(st.mlp_in_sq)[None, :]
        xd = LayerStats.norm(st.down_in_sq)[None, :]
        return (Wg.abs() * xin).sum(1) + (Wu.abs() * xin).sum(1) + (Wd.abs() * xd).sum(0)
    if method == "flap":
        return st.var(st.down_in_sum, st.down_in_sq) * (Wd * Wd).sum(0)
    raise ValueError(f"unknown baseline {method!r}")


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores (ties: lower index first)."""
    if k <= 0:
        return []
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])


def pruned_heads(scores: torch.Tensor, num_heads: int, num_kv_heads: int, removed: int) -> list[int]:
    """The ``removed`` query heads to prune: ``removed / G`` lowest-scoring heads of every KV
    group (transformers needs every group to keep the same count)."""
    if removed % num_kv_heads:
        raise ValueError(f"{removed} heads cannot come evenly from {num_kv_heads} KV groups")
    g = num_heads // num_kv_heads
    per = removed // num_kv_heads
    out = []
    for grp in range(num_kv_heads):
        out += [grp * g + i for i in _lowest(scores[grp * g : (grp + 1) * g], per)]
    return sorted(out)


# ------------------------------------------------------------------------------ plan + prune


def uniform_plan(model, target: float, adds_bias: bool):
    """slimllm's parameter plan for the same ratio r in every layer, reaching ``target`` (the
    fraction of ALL parameters to remove) as closely as the rounding allows.

    Equal layer importances make the paper's softmax allocation uniform; ``adds_bias`` counts
    the o_proj / down_proj biases a bias-compensating method adds (as slimllm's recovery)."""
    adapter = get_adapter(model)
    specs = layer_specs(model, adapter)
    return plan_for_target(
        target,
        [1.0] * len(specs),
        specs,
        count_parameters(model),
        recovery="affine" if adds_bias else "none",
    )


@torch.no_grad()
def prune_baseline(model, method: str, target: float, stats: list[LayerStats] | None = None,
                   calibration=None, batch_size: int = 8) -> dict:
    """Prune ``model`` in place with a baseline at the fraction ``target`` of all parameters.

    ``stats`` (from :func:`collect_stats` on the *dense* model) or ``calibration`` (then the
    statistics are collected here) are needed by ``wanda`` and ``flap``. Returns a report:
    method, target and achieved ratio, parameter counts, per-layer removed heads/channels,
    seconds (statistics / scoring+slicing)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    before = count_parameters(model)
    t_stats = 0.0
    if method in NEEDS_STATS and stats is None:
        if calibration is None:
            raise ValueError(f"{method} needs calibration activations (stats or calibration)")
        stats = collect_stats(model, calibration, batch_size)
        t_stats = time.perf_counter() - t0
    plan = uniform_plan(model, target, method in ADDS_BIAS)
    layers = adapter.layers(model)
    per_layer = []
    for i, (layer, lp) in enumerate(zip(layers, plan.layers)):
        st = stats[i] if stats is not None else None
        shape = adapter.layer_shape(layer)
        H, G, Fi = shape.num_heads, shape.num_kv_heads, shape.intermediate_size
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        if lp.kv_heads_removed:
            raise NotImplementedError("baselines prune query heads only (uniform GQA mode)")
        if lp.heads_removed:
            drop = pruned_heads(head_scores(method, adapter, layer, st), H, G, lp.heads_removed)
            keep = [a for a in range(H) if a not in set(drop)]
            bias = None
            if method in ADDS_BIAS:
                cols = slicing.head_rows(drop, shape.head_dim)
                Wo = attn.o_proj.weight.detach().double().cpu()
                bias = Wo[:, cols] @ st.mean(st.o_in_sum)[cols]
                if attn.o_proj.bias is not None:
                    bias = bias + attn.o_proj.bias.detach().double().cpu()
            slicing.keep_heads(adapter, layer, keep)
            if bias is not None:
                slicing.set_linear(attn.o_proj, bias=bias)
        if lp.channels_removed:
            drop = _lowest(channel_scores(method, adapter, layer, st), lp.channels_removed)
            dropped = set(drop)
            keep = [c for c in range(Fi) if c not in dropped]
            bias = None
            if method in ADDS_BIAS:
                idx = torch.as_tensor(drop, dtype=torch.long)
                Wd = mlp.down_proj.weight.detach().double().cpu()
                bias = Wd[:, idx] @ st.mean(st.down_in_sum)[idx]
                if mlp.down_proj.bias is not None:
                    bias = bias + mlp.down_proj.bias.detach().double().cpu()
            slicing.keep_channels(adapter, layer, keep)
            if bias is not None:
                slicing.set_linear(mlp.down_proj, bias=bias)
        per_layer.append(
            {
                "index": i,
                "ratio": lp.ratio,
                "heads_removed": lp.heads_removed,
                "channels_removed": lp.channels_removed,
            }
        )
    after = count_parameters(model)
    if after != plan.params_after:  # the plan and the sliced model must agree exactly
        raise AssertionError(f"{method}: {after} parameters after pruning, plan said {plan.params_after}")
    return {
        "method": method,
        "target_ratio": target,
        "achieved_ratio": (before - after) / before,
        "per_layer_ratio": plan.base_ratio,
        "parameters": {"before": before, "after": after},
        "layers": per_layer,
        "seconds": {"statistics": t_stats, "total": time.perf_counter() - t0},
    }


# ------------------------------------------------------------------------------ torch-pruning


#: Torch-Pruning's own LLM recipe (its examples/LLMs/prune_llm.py: MetaPruner with
#: GroupMagnitudeImportance, num_heads for q/k/v, prune_num_heads, no head-dim pruning,
#: round_to 4) on a 1-layer Llama with SmolLM2's attention layout (9 query heads, 3 KV heads);
#: prints a line per stage reached.
_TORCH_PRUNING_PROBE = """
import time, torch, transformers, torch_pruning as tp
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=144, intermediate_size=384,
    num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3, head_dim=16,
    max_position_embeddings=64)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).eval()
heads = {}
for name, m in model.named_modules():
    if name.endswith("self_attn"):
        heads.update({m.q_proj: 9, m.k_proj: 3, m.v_proj: 3})
t = time.perf_counter()
pruner = tp.pruner.MetaPruner(model, example_inputs=torch.randint(0, 256, (1, 8)),
    importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
    global_pruning=False, pruning_ratio=0.2, ignored_layers=[model.lm_head], num_heads=heads,
    prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.2, round_to=4,
    output_transform=lambda out: out.logits)
print(f"dependency graph built in {time.perf_counter() - t:.1f} s", flush=True)
for group in pruner.step(interactive=True):
    group.prune()
print(f"pruned in {time.perf_counter() - t:.1f} s", flush=True)
model(torch.randint(0, 256, (1, 8)))
print("pruned model runs", flush=True)
"""


def torch_pruning_status(timeout: float = 120.0) -> str:
    """Whether Torch-Pruning's LLM pruning runs here: its own recipe on a 1-layer GQA Llama
    (``_TORCH_PRUNING_PROBE``), run in a subprocess for at most ``timeout`` seconds. Returns a
    sentence for the quality table: not installed, the stage it stopped at (timeout or the
    error's last line), or that it ran."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        return "torch-pruning is not installed (pip install torch-pruning), so it is not a baseline"
    what = (f"torch-pruning {tp_version} with its LLM recipe on a 1-layer Llama with 9 query / 3 KV "
            f"heads (transformers {version('transformers')})")
    try:
        run = subprocess.run([sys.executable, "-c", _TORCH_PRUNING_PROBE], capture_output=True,
                             text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        reached = out.strip().splitlines()[-1] if out.strip() else "the dependency graph was not built"
        return f"{what}: did not finish within {timeout:.0f} s ({reached}; see benches/README.md), so it is not a baseline"
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0:
        error = (run.stderr.strip().splitlines() or ["no error output"])[-1]
        reached = lines[-1] if lines else "the dependency graph was not built"
        return f"{what}: failed ({reached}; {error}), so it is not a baseline"
    return f"{what}: ran ({'; '.join(lines)}) but is not wired in as a baseline row"


# ------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    """Prune the model with one baseline and print perplexity: a quick standalone check."""
    from slimllm.pruning.calibration import FILE_SAMPLES, load_calibration
    from slimllm.io.checkpoint import load_model
    from slimllm.evaluation.evaluate import evaluate_perplexity

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF folder, hub id or .gguf")
    p.add_argument("--method", choices=METHODS, default="flap")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters to remove")
    p.add_argument("--calib", default=None, help="calibration .jsonl/.txt (default: shared C4 sample)")
    p.add_argument("--num-samples", type=int, default=FILE_SAMPLES,
                   help=f"calibration sequences (default: prune's, {FILE_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-windows", type=int, default=64)
    a = p.parse_args(argv)
    from slimllm.evaluation.tasks import resolve_data_dir

    model, tok = load_model(a.model)
    calib = None
    if a.method in NEEDS_STATS:
        path = a.calib or str(resolve_data_dir(a.data_dir) / "c4" / "c4_sample.jsonl")
        calib = load_calibration(tok, calib_file=path, num_samples=a.num_samples, seq_len=a.seq_len, seed=a.seed)
    rep = prune_baseline(model, a.method, a.ratio, calibration=calib)
    print(f"{a.method}: removed {rep['achieved_ratio']:.2%} of parameters "
          f"(per-layer ratio {rep['per_layer_ratio']:.3f}) in {rep['seconds']['total']:.1f} s")
    for name in ("wikitext2", "ptb"):
        r = evaluate_perplexity(model, tok, name, data_dir=a.data_dir, max_windows=a.max_windows, batch_size=8)
        print(f"{name}: ppl {r.ppl:.2f} ({r.windows} windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
