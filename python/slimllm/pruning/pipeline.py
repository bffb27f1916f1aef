"""The pruning pipeline: ``PruneConfig`` and ``prune_model`` (DESIGN.md section 1).

``prune_model`` walks the decoder blocks of an in-memory transformers model one at a time, in
the style of a sequential (SparseGPT-like) pipeline:

1. capture: the inputs of block 0 (hidden states) and the keyword arguments every block gets
   (position embeddings, attention mask, position ids) are recorded by running the model with
   its decoder layers temporarily replaced by recorders (the last one stops the forward, so the
   LM head never runs), in chunks of ``batch_size`` sequences;
2. pass A, dense: every block runs once on the dense hidden states; s_i = mean over tokens of
   cos(h_in, h_out) is the layer importance (DESIGN.md section 5) and fixes the per-layer
   ratios (``slimllm.pruning.ratios``);
3. per block, on the outputs of the already pruned blocks before it (errors propagate as in
   the paper):

   - pass 1: forward up to the o_proj input, streamed into ``_core.Moments`` (D); heads are
     ranked and chosen (``head_pair_stats``, ``select_heads``), the o_proj recovery is fitted
     from the same moments (ridge-delta, ridge or affine) and the attention is sliced; for a
     family whose norms span a whole projection (``adapter.width_norms``, OLMo 2's q_norm /
     k_norm) the kept heads' outputs change with the slicing, so the attention is sliced
     first and the fit uses the sliced attention's o_proj inputs (pass 1b,
     :func:`_fit_sliced_o_proj`);
   - pass 2: the block runs with the pruned attention (its o_proj applied to the stored pass-1
     (1b) inputs, the rest of the attention is not recomputed); hooks stream the MLP input
     (``SquareSums`` d), the down_proj input a = act(gate x) * up x (``SquareSums`` F, and
     ``Moments`` F for ridge) and the bias-free MLP output (``Moments`` d); channels are scored
     and chosen (``channel_scores``, ``select_channels``); the affine recovery streams
     pruned vs full MLP outputs (from the stored a) into ``PairedMoments``; the MLP is sliced;
     with ``recovery_target="block"`` the down_proj moments also carry the block's error
     against the dense block output, which the re-fit then reproduces;
   - pass 3: the block's outputs with both parts pruned (attention and MLP results fed from
     the stored tensors, so only norms and residual adds run) are the next block's inputs.

With ``state_dir`` (``python -m slimllm prune`` always gives one, ``OUTPUT.partial``), the
dense references after pass A and every finished block with the next block's inputs are
recorded on disk (:mod:`slimllm.pruning.resume`), so a killed run continues after its last finished
block with identical results.

Only the current block is moved to ``device``. With ``lazy`` (a
:class:`slimllm.io.lazy.LazyCheckpoint`, issue 11) the model is a skeleton on the meta device:
each block is read from the checkpoint just before it is used and released right after; a
pruned block is dropped once its state file (the output's shard) is written, or kept in the
saved dtype when there is no state (:func:`_finish_block`). Activations reach the core as
C-contiguous float32/float64 numpy arrays (bf16/f16 are upcast to float32). Nothing is
materialised per head or per channel.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slimllm import _core
from slimllm.families.adapters import get_adapter
from slimllm.errors import (
    CalibrationError,
    ConfigError,
    DistributedError,
    NonFiniteError,
    SlimLLMError,
)
from slimllm.pruning.ratios import (
    HEAD_MODES,
    count_parameters,
    layer_specs,
    plan_for_target,
    plan_from_layer_ratios,
    plan_from_ratios,
)

__all__ = ["PruneConfig", "prune_model", "RECOVERY_MODES"]

RECOVERY_MODES = ("affine", "ridge", "ridge-delta", "none")
#: what the down_proj recovery reproduces: its own dense output on the block's (pruned-path)
#: inputs, or the dense model's block output (so it also absorbs the attention's and the
#: earlier blocks' error)
RECOVERY_TARGETS = ("projection", "block")
#: default ridge_damp per recovery mode (measured on SmolLM2-135M at 20%, WikiText-2 PPL@128,
#: benches/README.md "Default recovery")
DEFAULT_RIDGE_DAMP = {"ridge": 0.01, "ridge-delta": "auto"}
#: ridge_damp values searched per projection with ``ridge_damp="auto"``
RIDGE_DAMP_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: with ``ridge_damp="auto"``, calibration sequences i with i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
#: are held out to choose the damping
HOLDOUT_EVERY = 4


@dataclass
class PruneConfig:
    """Every option of a prune, validated when the object is built (ConfigError).

    Attributes:
        ratio: fraction of ALL model parameters to remove, in [0, 1); 0 is a no-op. The base
            ratio R of DESIGN.md section 5 is searched so the exact parameter count matches.
            Exactly one of ``ratio`` and ``layer_ratios`` must be given.
        layer_ratios: explicit per-layer ratios r_i in [0, 1) (no allocation, no target
            search, no clamping: a ratio leaving a layer without heads or channels is an error).
        pruned_layers: k, how many blocks (the k of highest importance) are pruned; None = all.
        alpha: softmax temperature of the ratio allocation (paper: 10).
        head_mode: ``"uniform"`` (same number of query heads removed from every KV group) or
            ``"kv-group"`` (whole KV groups removed, k_proj/v_proj rows too).
        greedy: run the paper's greedy head swap (Algorithm 1) after the score ranking.
        recovery: ``"ridge-delta"`` (default: the least squares re-fit of o_proj /
            down_proj over the kept inputs, DESIGN.md section 2, regularised toward the
            original kept weights instead of toward zero), ``"affine"`` (per-coordinate scale
            + bias, the paper's recovery), ``"ridge"`` (the re-fit shrunk toward zero) or
            ``"none"``. ridge-delta is the default because it measured lowest on SmolLM2-135M
            at 20% over calibration seeds 0-2 (benches/README.md "Default recovery").
        recovery_target: ``"projection"`` (default): the down_proj re-fit reproduces the full
            down_proj's output on the same inputs; ``"block"``: it reproduces the dense model's
            output of the whole block minus the pruned block's output before the MLP, i.e. the
            MLP's re-fit also absorbs the error of the pruned attention and of the blocks
            before (the residual stream is what the next block sees). Ridge modes only; not for
            families with a norm after the MLP (the MLP output is then not additive).
        ridge_damp: ridge lambda relative to mean(diag C_KK) (DESIGN.md section 2); None
            picks the mode's default (:data:`DEFAULT_RIDGE_DAMP`: 0.01 for ridge, ``"auto"``
            for ridge-delta). ``"auto"``: chosen per projection from :data:`RIDGE_DAMP_GRID` by
            the reconstruction error on held-out calibration sequences (every
            :data:`HOLDOUT_EVERY`-th one; the fits of the grid use the others), then refitted
            on all sequences with the chosen value (recorded per layer in the report as
            ``o_proj_ridge_damp`` / ``down_proj_ridge_damp``).
        protect_lowest: fraction of the lowest-scoring channels kept before pruning the next
            ones (paper quirk, 0.01).
        channel_multiple: channels are removed in multiples of this (1, 8, 64, 128, ...).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; the block being pruned is moved there.
        batch_size: calibration sequences per forward chunk.
        progress: show tqdm progress bars.
    """

    ratio: float | None = None
    layer_ratios: Sequence[float] | None = None
    pruned_layers: int | None = None
    alpha: float = 10.0
    head_mode: str = "uniform"
    greedy: bool = True
    recovery: str = "ridge-delta"
    ridge_damp: float | str | None = None
    recovery_target: str = "projection"
    protect_lowest: float = 0.01
    channel_multiple: int = 1
    device: str = "cpu"
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        if self.layer_ratios is not None:
            self.layer_ratios = tuple(float(r) for r in self.layer_ratios)
        if self.ridge_damp is None and self.recovery in DEFAULT_RIDGE_DAMP:
            self.ridge_damp = DEFAULT_RIDGE_DAMP[self.recovery]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on any invalid setting (called on construction)."""

        def number(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value!r}")

        def integer(name, value, minimum, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")

        if (self.ratio is None) == (self.layer_ratios is None):
            raise ConfigError("give exactly one of ratio (fraction of all parameters) and layer_ratios")
        number("ratio", self.ratio, allow_none=True)
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio must be in [0, 1) (a fraction of all parameters), got {self.ratio}")
        if self.layer_ratios is not None:
            if not self.layer_ratios:
                raise ConfigError("layer_ratios is empty")
            for i, r in enumerate(self.layer_ratios):
                if not (math.isfinite(r) and 0 <= r < 1):
                    raise ConfigError(f"layer_ratios[{i}] must be in [0, 1), got {r}")
            if self.pruned_layers is not None:
                raise ConfigError("pruned_layers applies to the ratio allocation, not to layer_ratios")
        integer("pruned_layers", self.pruned_layers, 1, allow_none=True)
        number("alpha", self.alpha)
        if self.head_mode not in HEAD_MODES:
            raise ConfigError(f"head_mode must be one of {', '.join(HEAD_MODES)}, got {self.head_mode!r}")
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"greedy must be a bool, got {self.greedy!r}")
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(
                f"recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.recovery!r}"
            )
        if self.recovery_target not in RECOVERY_TARGETS:
            raise ConfigError(
                f"recovery_target must be one of {', '.join(RECOVERY_TARGETS)}, "
                f"got {self.recovery_target!r}"
            )
        if self.recovery_target == "block" and not self.recovery.startswith("ridge"):
            raise ConfigError(
                f'recovery_target="block" needs a ridge recovery (ridge or ridge-delta), '
                f"got recovery={self.recovery!r}"
            )
        if self.ridge_damp != "auto":
            number("ridge_damp", self.ridge_damp, allow_none=True)
        if self.ridge_damp not in (None, "auto") and self.ridge_damp < 0:
            raise ConfigError(f"ridge_damp must be >= 0, got {self.ridge_damp}")
        number("protect_lowest", self.protect_lowest)
        if not 0 <= self.protect_lowest < 1:
            raise ConfigError(f"protect_lowest must be in [0, 1), got {self.protect_lowest}")
        integer("channel_multiple", self.channel_multiple, 1)
        integer("batch_size", self.batch_size, 1)
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s)"
                )

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (recorded in the report)."""
        d = asdict(self)
        if d["layer_ratios"] is not None:
            d["layer_ratios"] = list(d["layer_ratios"])
        return d


# ---------------------------------------------------------------------------------------------
# helpers


class _Stop(Exception):
    """Raised inside a hook or recorder to end a forward early."""


class _Timings:
    """Exclusive wall time per stage (nested stages are subtracted from their parent)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []

    @contextmanager
    def __call__(self, name: str):
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - entry[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - entry[2]
            if self._stack:
                self._stack[-1][2] += elapsed


@contextmanager
def _context(what: str):
    """Re-raise a core error with the layer / tensor it concerns prefixed to the message."""
    try:
        yield
    except SlimLLMError as err:
        if getattr(err, "_slimllm_context", False):
            raise
        try:
            new = type(err)(f"{what}: {err}")
        except Exception:  # pragma: no cover - exotic exception signature
            raise err
        new._slimllm_context = True
        raise new from err


def _np(t: torch.Tensor) -> np.ndarray:
    """A (tokens, dim) float32/float64 C-contiguous numpy view/copy of an activation."""
    t = t.detach()
    t = t.reshape(-1, t.shape[-1])
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.cpu().numpy())


def _np64(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float64).numpy())


def _to(obj: Any, device: torch.device, memo: dict | None = None) -> Any:
    """``obj`` (tensors in nested tuples/lists/dicts) on ``device``; ``memo`` maps tensors
    already moved (by id) so that objects shared by every layer are moved once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id stays unique
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensor_like(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype=like.dtype, device=like.device)


def _layer_device(layer: torch.nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _override_forward(module: torch.nn.Module, fn):
    """Temporarily replace ``module.forward`` (instance attribute)."""
    module.forward = fn
    try:
        yield
    finally:
        del module.forward


def _calibration_chunks(calibration_batches: Any, batch_size: int, vocab_size: int | None):
    """(chunks, description): int64 tensors of at most batch_size sequences each."""
    description: dict = {}
    if hasattr(calibration_batches, "input_ids") and hasattr(calibration_batches, "description"):
        description = dict(calibration_batches.description)
        calibration_batches = calibration_batches.input_ids
    if isinstance(calibration_batches, torch.Tensor):
        batches = [calibration_batches]
    elif isinstance(calibration_batches, dict) and "input_ids" in calibration_batches:
        batches = [calibration_batches["input_ids"]]
    else:
        batches = []
        for b in calibration_batches:
            if isinstance(b, dict):
                b = b["input_ids"]
            batches.append(torch.as_tensor(b))
    chunks = []
    for b in batches:
        if b.dim() == 1:
            b = b.unsqueeze(0)
        if b.dim() != 2 or b.dtype.is_floating_point or b.dtype == torch.bool:
            raise CalibrationError(
                f"calibration batches must be integer token ids of shape (sequences, tokens), "
                f"got {tuple(b.shape)} {b.dtype}"
            )
        if b.numel() == 0:
            continue
        chunks.extend(b.to(torch.long).split(batch_size, dim=0))
    if not chunks:
        raise CalibrationError("the calibration set is empty")
    if vocab_size is not None:
        top = max(int(c.max()) for c in chunks)
        low = min(int(c.min()) for c in chunks)
        if low < 0 or top >= vocab_size:
            raise CalibrationError(
                f"calibration token ids must be in [0, {vocab_size}), found {low}..{top}"
            )
    n = sum(c.shape[0] for c in chunks)
    lengths = sorted({c.shape[1] for c in chunks})
    description.setdefault("source", "in-memory batches")
    description["num_samples"] = n
    description["seq_len"] = lengths[0] if len(lengths) == 1 else lengths
    description["tokens"] = sum(c.numel() for c in chunks)
    return chunks, description


def _capture(model, adapter, chunks, device, timings):
    """Block-0 hidden states and per-layer block kwargs for every chunk.

    Returns ``(hidden, kwargs)``: ``hidden[c]`` (b, L, d) on ``device``; ``kwargs[i][c]`` the
    keyword arguments block i receives for chunk c (tensors on ``device``; cache disabled).
    """
    layers = adapter.layers(model)
    n = len(layers)
    hidden: list = []
    kwargs: list = [[] for _ in range(n)]
    memo: dict = {}
    first_param = next(model.parameters())
    embed_device = first_param.device
    try:
        embed = model.get_input_embeddings()
        embed_device = embed.weight.device
    except (AttributeError, NotImplementedError):  # pragma: no cover
        pass

    def recorder(index):
        def record(*args, **kw):
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kw.pop("hidden_states"), ()
            if rest:
                raise SlimLLMError(
                    f"layer {index}: unexpected positional arguments to the decoder layer"
                )
            kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
            kw["use_cache"] = False
            kwargs[index].append(_to(kw, device, memo))
            if index == 0:
                hidden.append(h.detach().to(device))
            if index == n - 1:
                raise _Stop
            return h

        return record

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with timings("forward"):
            for chunk in chunks:
                try:
                    model(input_ids=chunk.to(embed_device), use_cache=False)
                except _Stop:
                    pass
                else:  # pragma: no cover - the last recorder always stops
                    raise SlimLLMError("the capture forward did not reach the last decoder layer")
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
    for c, h in enumerate(hidden):
        if not torch.isfinite(h).all():
            raise NonFiniteError(f"block 0 input (embeddings), chunk {c}: non-finite values")
    return hidden, kwargs


def _run_layer(layer, h, kw):
    return _first(layer(h, **kw))


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(cos.sum()), cos.numel()


# ---------------------------------------------------------------------------------------------
# the pipeline


def prune_model(model, tokenizer, calibration_batches, config: PruneConfig, state_dir=None,
                lazy=None, dist=None):
    """Prune ``model`` in place, block by block (DESIGN.md sections 1-5), and return it with
    the report.

    Args:
        model: a transformers ``*ForCausalLM`` of a supported family (Llama, Mistral, Qwen2,
            Qwen3, SmolLM2, Granite, Gemma, Gemma 2, Gemma 3 text, Phi-3, OLMo 2), any dtype, on CPU (or already on ``config.device``).
        tokenizer: its tokenizer (only used for the report; may be None).
        calibration_batches: a ``slimllm.pruning.calibration.CalibrationSet``, an int64 tensor
            (N, L), or an iterable of (b, L) tensors / ``{"input_ids": ...}`` dicts; re-chunked
            into ``config.batch_size`` sequences.
        config: a validated :class:`PruneConfig`.
        state_dir: optional folder (str or path) for the resumable state of this run
            (:mod:`slimllm.pruning.resume`): after the dense pass and after every block the progress
            is recorded there, atomically. If it already holds the state of an interrupted
            run of the same model, calibration set and settings, that run continues after its
            last finished block and ends with exactly the tensors and report entries an
            uninterrupted run gives (the report's ``resumed_from_block`` says where it
            restarted; its timings cover this call only). The caller deletes the folder once
            the result is saved.
        lazy: optional :class:`slimllm.io.lazy.LazyCheckpoint` whose ``model`` is ``model``
            (a skeleton with parameters on meta): each block is materialised from the source
            in ``lazy.compute_dtype`` just before the dense pass / the walk use it and put back
            on meta right after. Without ``state_dir`` a pruned block stays in memory on the
            CPU in ``lazy.dtype``; with one it is dropped once committed (back to meta with
            its pruned shapes: the state's block file holds it, and
            :func:`slimllm.io.streaming.save_pruned_from_state` writes the output from those
            files), so memory holds one block at a time (:func:`_finish_block`). The
            embeddings are materialised for the capture, and again (in ``lazy.dtype``) before
            returning.
        dist: optional :class:`slimllm.pruning.distributed.Distributed` (torchrun): this
            process runs its contiguous share of the calibration chunks and every statistic,
            cosine sum and token count is combined over the ranks before it is used, so every
            rank prunes identically (the single-process result up to float64 rounding). Every
            rank gets the same calibration set; give ``state_dir`` on rank 0 only. On the
            other ranks, which save nothing, a ``lazy`` model's pruned blocks are dropped as
            with a state (back to meta with their pruned shapes): only rank 0's model is whole.

    Returns:
        ``(model, report)``: the same model object with smaller Linear modules (and added
        o_proj / down_proj biases under recovery), runnable with ``forward``/``generate``;
        ``report`` a JSON-serialisable dict (see README / DESIGN.md): per-layer ratios,
        importances, kept heads / KV heads / channels, head objectives, layer cosine
        similarities, calibration description, parameter counts and achieved ratio, timings
        in seconds.

    Raises:
        ConfigError: invalid or unreachable settings (before any weight changes).
        UnsupportedArchitectureError: no adapter for the model.
        CalibrationError: empty calibration set or token ids outside the vocabulary.
        NonFiniteError: NaN/inf activations (found in the dense pass, before any weight
            changes; the message names the layer and tensor).
        CheckpointError: ``state_dir`` is not a slimllm state folder, or cannot be written.
        ConfigError: ``state_dir`` holds the state of a run with another model, calibration
            set or settings (the message names what differs).
        DistributedError: ``dist`` with fewer calibration chunks than ranks, or with a
            resumable ``state_dir``.
        Other ``SlimLLMError`` subclasses from the core, prefixed with the layer and tensor. An
        error during the block walk leaves earlier blocks pruned in memory.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a PruneConfig, got {type(config).__name__}")
    config.validate()
    timings = _Timings()
    t_start = time.perf_counter()
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    n_layers = len(layers)
    specs = layer_specs(model, adapter)
    for i, s in enumerate(specs):
        if s.num_kv_heads < 1 or s.num_heads % s.num_kv_heads:
            raise ConfigError(
                f"layer {i}: {s.num_heads} query heads do not divide into {s.num_kv_heads} KV heads"
            )
    if config.layer_ratios is not None and len(config.layer_ratios) != n_layers:
        raise ConfigError(
            f"layer_ratios has {len(config.layer_ratios)} entries for a model of {n_layers} layers"
        )
    if config.pruned_layers is not None and config.pruned_layers > n_layers:
        raise ConfigError(f"pruned_layers must be in [1, {n_layers}], got {config.pruned_layers}")
    total_params = count_parameters(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    chunks, calib_desc = _calibration_chunks(calibration_batches, config.batch_size, vocab)
    if _auto_damp(config) and calib_desc["num_samples"] < HOLDOUT_EVERY:
        raise CalibrationError(
            f'ridge_damp="auto" holds out every {HOLDOUT_EVERY}th calibration sequence: needs at '
            f"least {HOLDOUT_EVERY} sequences, got {calib_desc['num_samples']}; give more "
            "calibration sequences or a numeric ridge_damp (e.g. --ridge-damp 1.0)"
        )
    device = torch.device(config.device)

    report: dict = {
        "method": "SlimLLM (Guo et al., ICML 2025), slimllm block-by-block pipeline",
        "architecture": adapter.name,
        "num_layers": n_layers,
        "config": config.to_dict(),
        "calibration": calib_desc,
    }

    noop = (config.ratio == 0) if config.layer_ratios is None else not any(config.layer_ratios)
    if noop:
        plan = plan_from_ratios([0.0] * n_layers, specs, total_params, recovery=config.recovery,
                                target_ratio=config.ratio)
        report.update(_plan_report(plan))
        report["layers"] = [_layer_entry(p, specs[p.index]) for p in plan.layers]
        report["timings"] = {"total": time.perf_counter() - t_start}
        if lazy is not None:
            for i in range(n_layers):
                lazy.load_block(i)
                lazy.keep_block(i)
            lazy.load_outer(lazy.dtype)
        return model, report

    state = expected = None
    if state_dir is not None:
        from slimllm.pruning.resume import PruneState, fingerprint

        state = PruneState.open(state_dir)
        expected = fingerprint(model, chunks, _fingerprinted(config, dist),
                               tensors=None if lazy is None else lazy.tensors())
        if state.resumable:
            if dist is not None:
                raise DistributedError(
                    f"{state_dir}: resuming is not supported with several processes (the state "
                    "holds rank 0's hidden states only); delete it to start over"
                )
            state.check(expected)
            report["resumed_from_block"] = state.finished
    first_sequence = 0
    if dist is not None:
        share = dist.share(len(chunks))
        first_sequence = sum(c.shape[0] for c in chunks[:share.start])
        chunks = chunks[share.start:share.stop]
        report["processes"] = dist.world_size

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            report_layers, plan = _walk(model, adapter, layers, specs, chunks, config, device,
                                        total_params, timings, state, expected, lazy,
                                        _Reduce(dist, first_sequence))
    finally:
        model.train(was_training)
    if lazy is not None:
        lazy.load_outer(lazy.dtype)

    params_after = count_parameters(model)
    report.update(_plan_report(plan))
    report["parameters"]["counted_after"] = params_after
    report["parameters"]["achieved_ratio"] = (total_params - params_after) / total_params
    report["layers"] = report_layers
    timings.seconds["total"] = time.perf_counter() - t_start
    report["timings"] = {k: round(v, 6) for k, v in timings.seconds.items()}
    return model, report


def _fingerprinted(config: PruneConfig, dist) -> dict:
    """The settings recorded in a resume state: with several processes the world size too, so
    a single-process run refuses to resume a state holding rank 0's share only."""
    d = config.to_dict()
    if dist is not None:
        d["world_size"] = dist.world_size
    return d


class _Reduce:
    """What the walk combines over processes (:mod:`slimllm.pruning.distributed`); without
    ``dist`` every method returns its input. ``first_sequence``: global index of this
    process's first calibration sequence (for the held-out split)."""

    def __init__(self, dist, first_sequence: int = 0):
        self.dist = dist
        self.first_sequence = first_sequence

    def sum(self, *values: float) -> tuple[float, ...]:
        return values if self.dist is None else self.dist.sum(*values)

    def stat(self, acc):
        return acc if self.dist is None else self.dist.combine(acc)


def _plan_report(plan) -> dict:
    return {
        "parameters": {
            "before": plan.params_before,
            "after": plan.params_after,
            "removed": plan.params_removed,
            "target_ratio": plan.target_ratio,
            "achieved_ratio": plan.achieved_ratio,
        },
        "base_ratio": plan.base_ratio,
    }


def _layer_entry(p, spec) -> dict:
    H, G, Fi = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    return {
        "index": p.index,
        "importance": p.importance,
        "ratio": p.ratio,
        "clamped": list(p.clamped),
        "heads_removed": p.heads_removed,
        "kv_heads_removed": p.kv_heads_removed,
        "channels_removed": p.channels_removed,
        "num_heads": [H, H - p.heads_removed],
        "num_kv_heads": [G, G - p.kv_heads_removed],
        "intermediate_size": [Fi, Fi - p.channels_removed],
        "kept_heads": list(range(H)),
        "kept_kv_heads": list(range(G)),
        "kept_channels": list(range(Fi)),
    }


def _acquire(lazy, i, layer, device):
    """Block ``i`` on the compute ``device``: materialised from the source (lazy) or moved
    there. Returns where the block lives between uses (None when lazy)."""
    if lazy is not None:
        lazy.load_block(i, device)
        return None
    home = _layer_device(layer)
    layer.to(device)
    return home


def _release(lazy, i, layer, home):
    """Undo :func:`_acquire` for a block that was not changed (dense pass)."""
    if lazy is not None:
        lazy.release_block(i)
    else:
        layer.to(home)


def _finish_block(lazy, i, layer, home, drop):
    """Block ``i`` is pruned and committed to the resume state: the one point where a
    finished block leaves the walk. Eager: back to its home device; lazy and ``drop`` (with a
    state its file is the output's shard, :func:`slimllm.io.streaming.save_pruned_from_state`;
    on a rank other than 0 nothing is saved): dropped (back to meta, pruned shapes kept);
    lazy otherwise: kept on the CPU in the saved dtype."""
    if lazy is None:
        layer.to(home)
    elif drop:
        lazy.release_block(i)
    else:
        lazy.keep_block(i)


def _walk(model, adapter, layers, specs, chunks, config, device, total_params, timings,
          state=None, expected=None, lazy=None, reduce=None):
    from tqdm.auto import tqdm

    from slimllm.pruning import slicing

    n_layers = len(layers)
    reduce = reduce or _Reduce(None)
    if lazy is not None:
        lazy.load_outer()
    hidden0, block_kwargs = _capture(model, adapter, chunks, device, timings)
    if lazy is not None:
        lazy.release_outer()
    resuming = state is not None and state.resumable
    if resuming:
        importance = state.importance
    else:
        importance, dense_out = _dense_pass(layers, hidden0, block_kwargs, config, device,
                                            timings, lazy, reduce)
    plan = _plan(config, specs, total_params, importance)
    layout = None if state is None else _block_layout(model, plan, specs, lazy)

    start, entries, h = 0, [], hidden0
    if resuming:  # blocks before `start` come back from disk exactly as they were pruned
        start, entries = state.finished, state.entries
        with timings("resume"):
            for i in range(start):
                _restore_block(adapter, slicing, layers[i], entries[i],
                               layout.layer_tensors(i, state.block(i)), assign=lazy is not None)
                if lazy is not None:
                    lazy.release_block(i)  # streamed: the state file is the output's shard
            if 0 < start < n_layers:  # block 0's inputs are the captured embeddings
                h = [t.to(device) for t in state.hidden(start)]
    elif state is not None:
        with timings("saving state"):
            state.start(expected, importance, dense_out, layout.to_dict())
        dense_out = None  # read back block by block

    # ---- block walk -------------------------------------------------------------------------
    del hidden0
    # a finished lazy block is dropped when its state file holds it or when this process is
    # not rank 0, which alone writes the output
    drop = state is not None or (reduce.dist is not None and reduce.dist.rank != 0)
    bar = tqdm(range(start, n_layers), desc="prune", unit="block", initial=start,
               total=n_layers, disable=not config.progress)
    for i in bar:
        layer = layers[i]
        p = plan.layers[i]
        spec = specs[i]
        home = _acquire(lazy, i, layer, device)
        entry = _layer_entry(p, spec)
        reference = state.dense(i) if state is not None else dense_out[i]
        target = None
        if config.recovery_target == "block":
            target = (reference, _mlp_residual_scale(model, layer))
        h, info = _prune_block(i, layer, adapter, slicing, p, spec, h, block_kwargs[i], config,
                               timings, target, reduce)
        entry.update(info)
        # drift: pruned block output vs the dense model's output of the same block
        total, count = 0.0, 0
        for y, d in zip(h, reference, strict=True):
            s, k = _mean_cos(y, d.to(y.device))
            total, count = total + s, count + k
        total, count = reduce.sum(total, count)
        entry["cos_vs_dense_output"] = total / count
        if state is None:
            dense_out[i] = None
        else:
            with timings("saving state"):
                state.commit(i, layout.checkpoint_tensors(i, layer.state_dict()), entry,
                             h if i + 1 < n_layers else None)
        _finish_block(lazy, i, layer, home, drop)
        entries.append(entry)
    return entries, plan


def _block_layout(model, plan, specs, lazy=None):
    """How the pruned blocks are saved (:func:`slimllm.io.streaming.plan_layout`), decided
    from the plan before any block changes: shapes from the removal counts, biases from the
    dense layers' plus those the recovery adds."""
    from slimllm.families.adapters import LayerShape
    from slimllm.io.streaming import plan_layout, planned_biases

    shapes = [
        LayerShape(s.num_heads - p.heads_removed, s.num_kv_heads - p.kv_heads_removed, s.head_dim,
                   s.intermediate_size - p.channels_removed)
        for p, s in zip(plan.layers, specs, strict=True)
    ]
    adapter = get_adapter(model)
    biases = [planned_biases(adapter, s, p.o_bias_added, p.down_bias_added)
              for p, s in zip(plan.layers, specs, strict=True)]
    return plan_layout(model, shapes, biases, None if lazy is None else lazy.dtype)[0]


def _dense_pass(layers, hidden0, block_kwargs, config, device, timings, lazy=None, reduce=None):
    """Pass A: every block once on the dense hidden states. Returns ``(importance,
    dense_out)``: s_i = mean over tokens of cos(h_in, h_out) (DESIGN.md section 5) and, per
    block and chunk, its dense outputs (bfloat16, CPU) for the report's drift field."""
    from tqdm.auto import tqdm

    n_layers = len(layers)
    importance = []
    dense_out: list = []
    h = hidden0
    for i in tqdm(range(n_layers), desc="importance", unit="block", disable=not config.progress):
        layer = layers[i]
        home = _acquire(lazy, i, layer, device)
        total, count = 0.0, 0
        outs = []
        with timings("forward"):
            for c, x in enumerate(h):
                y = _run_layer(layer, x, block_kwargs[i][c])
                s, k = _mean_cos(x, y)
                if not math.isfinite(s):  # NaN or inf anywhere in y (or x) makes the sum NaN
                    _release(lazy, i, layer, home)
                    raise NonFiniteError(
                        f"layer {i}: non-finite values in the block output of the dense forward "
                        f"(chunk {c}); check the weights of layer {i}"
                    )
                total, count = total + s, count + k
                outs.append(y)
        if reduce is not None:
            total, count = reduce.sum(total, count)
        dense_out.append([o.to(device="cpu", dtype=torch.bfloat16) for o in outs])
        importance.append(total / count)
        _release(lazy, i, layer, home)
        h = outs
    return importance, dense_out


def _plan(config, specs, total_params, importance):
    """The per-layer plan (``slimllm.pruning.ratios``, DESIGN.md section 5) from the importances."""
    if config.layer_ratios is not None:
        return plan_from_layer_ratios(
            config.layer_ratios, specs, total_params, importance, config.head_mode,
            config.channel_multiple, config.recovery,
        )
    return plan_for_target(
        config.ratio, importance, specs, total_params, config.pruned_layers, config.alpha,
        config.head_mode, config.channel_multiple, config.recovery,
    )


def _restore_block(adapter, slicing, layer, entry, tensors, assign=False):
    """Give dense block ``layer`` the shapes its report ``entry`` records and the exact
    tensors of its pruned state dict (resume). ``assign``: the block is on the meta device (a
    lazy model; its dense weights are never read) and takes the tensors themselves."""
    if entry["heads_removed"]:
        slicing.keep_heads(adapter, layer, entry["kept_heads"],
                           entry["kept_kv_heads"] if entry["kv_heads_removed"] else None)
    if entry["channels_removed"]:
        slicing.keep_channels(adapter, layer, entry["kept_channels"])
    for name, module in layer.named_modules():
        bias = tensors.get(f"{name}.bias")
        if isinstance(module, torch.nn.Linear) and module.bias is None and bias is not None:
            slicing.set_linear(module, bias=bias)
    layer.load_state_dict(tensors, strict=True, assign=assign)


def _mlp_residual_scale(model, layer) -> float:
    """m in block_out = h_mid + m * mlp_out (granite's ``residual_multiplier``, else 1), for
    ``recovery_target="block"``; ConfigError for a block whose MLP output is normed before the
    residual add (then no linear target exists)."""
    if any(hasattr(layer, name) for name in ("post_feedforward_layernorm", "post_mlp_layernorm")):
        raise ConfigError(
            f'recovery_target="block" needs the MLP output added to the residual stream as is; '
            f"{type(layer).__name__} norms it first"
        )
    return float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)


def _prune_block(i, layer, adapter, slicing, p, spec, h, kws, config, timings, target=None,
                 reduce=None):
    """Prune block i in place; returns (next block inputs, report fields).

    ``target``: None, or (the dense model's outputs of this block per chunk, m) for
    ``recovery_target="block"`` (see :func:`_mlp_residual_scale`). ``reduce``: a
    :class:`_Reduce` (statistics and cosine sums over processes)."""
    reduce = reduce or _Reduce(None)
    attn = adapter.attention(layer)
    mlp = adapter.mlp(layer)
    H, G, hd, Fi = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
    D = H * hd
    info: dict = {}
    prune_heads = p.heads_removed > 0
    prune_channels = p.channels_removed > 0

    if not prune_heads and not prune_channels:
        outs = []
        total, count = 0.0, 0
        with timings("forward"):
            for x, kw in zip(h, kws):
                y = _run_layer(layer, x, kw)
                s, k = _mean_cos(x, y)
                total, count = total + s, count + k
                outs.append(y)
        total, count = reduce.sum(total, count)
        info["layer_cosine"] = total / count
        return outs, info

    # ---- pass 1: o_proj inputs ----------------------------------------------------------------
    o_inputs: list = []
    attn_outs: list = []
    held = _held_out_rows(h, reduce.first_sequence) if _auto_damp(config) else None
    state = {"chunk": 0}
    if prune_heads:
        o_stats = _InputMoments(D, held)

        def o_pre(c, x):
            with timings("statistics"), _context(f"layer {i}, o_proj input"):
                o_stats.update(c, _np(x))

        o_inputs = _o_proj_inputs(layer, attn, h, kws, timings, o_pre)
        o_stats.combine(reduce)

        w_o = attn.o_proj.weight
        w_o64 = _np64(w_o)
        old_o_bias = None if attn.o_proj.bias is None else _np64(attn.o_proj.bias)
        with timings("ranking"), _context(f"layer {i}, o_proj input covariance"):
            moments = o_stats.all()
            cov = moments.covariance()
            m = _core.head_pair_stats(cov, w_o64, H)
        g = H // G
        if config.head_mode == "kv-group" or g == 1:
            mode, n_units = "kv-group", p.kv_heads_removed
        else:
            mode, n_units = "uniform", p.heads_removed
        with timings("greedy" if config.greedy else "ranking"), _context(f"layer {i}, heads"):
            sel = _core.select_heads(m, n_units, G, mode=mode, greedy=config.greedy)
        kept_heads = [int(a) for a in sel.kept]
        pruned_kv = [int(g_) for g_ in sel.pruned_kv_heads]
        kept_kv = [g_ for g_ in range(G) if g_ not in set(pruned_kv)]
        if len(kept_heads) != H - p.heads_removed or len(kept_kv) != G - p.kv_heads_removed:
            raise SlimLLMError(
                f"layer {i}: head selection kept {len(kept_heads)} heads / {len(kept_kv)} KV heads, "
                f"plan says {H - p.heads_removed} / {G - p.kv_heads_removed}"
            )
        cols = np.concatenate([np.arange(a * hd, (a + 1) * hd) for a in kept_heads])
        weight = bias = damp = None
        if adapter.width_norms:
            # the norms over the whole q/k projections change the kept heads' outputs: the
            # recovery is fitted on the sliced attention's o_proj inputs (pass 1b), which pass 2
            # then reads whole (the dense inputs are dropped)
            with timings("slicing"):
                slicing.keep_heads(
                    adapter, layer, kept_heads, kept_kv if p.kv_heads_removed else None
                )
            o_inputs, weight, bias, damp = _fit_sliced_o_proj(
                i, layer, attn, h, kws, o_inputs, w_o, w_o64, cols, config, held, timings, reduce
            )
            cols = np.arange(len(cols))
        else:
            with timings("regression"), _context(f"layer {i}, o_proj recovery"):
                if config.recovery == "affine":
                    scale, fit_bias = _core.affine_fit_heads(moments, w_o64, m, kept_heads)
                    weight = w_o64[:, cols] * np.asarray(scale)[:, None]
                    bias = np.asarray(fit_bias)
                elif config.recovery in ("ridge", "ridge-delta"):
                    weight, bias, damp = _ridge(o_stats, w_o64, cols, config)
            with timings("slicing"):
                slicing.keep_heads(
                    adapter, layer, kept_heads, kept_kv if p.kv_heads_removed else None
                )
        if config.recovery in ("ridge", "ridge-delta"):
            info["o_proj_ridge_damp"] = damp
        if bias is not None and old_o_bias is not None:
            bias = bias + old_o_bias
        if weight is not None:
            with timings("slicing"):
                slicing.set_linear(
                    attn.o_proj, weight=_tensor_like(weight, w_o), bias=_tensor_like(bias, w_o)
                )
        del moments, cov, o_stats
        info.update(
            kept_heads=kept_heads,
            kept_kv_heads=kept_kv,
            head_objective_initial=float(sel.initial_objective),
            head_objective=float(sel.objective),
            head_swaps=int(sel.swaps),
        )
        cols_t = torch.as_tensor(cols, dtype=torch.long, device=o_inputs[0].device)

    # ---- pass 2: MLP statistics with the pruned attention --------------------------------------

    def attn_from_inputs(*args, **kwargs):
        x = o_inputs[state["chunk"]]
        return attn.o_proj(x.index_select(-1, cols_t)), None

    def attn_record(_module, _args, out):
        attn_outs.append(_first(out).detach())

    d = spec.hidden_size
    handles = []
    acts: list = []
    y_full: list = []
    block_outs: list = []
    if prune_channels:
        in_sq = _core.SquareSums(d)
        act_sq = _core.SquareSums(Fi)
        # recovery_target="block": the down_proj fit sees [a, e] with e = (dense block output -
        # pruned block output with the full MLP) / m, its target W_down a + e (see _ridge)
        act_dim = Fi + d if target is not None else Fi
        act_mom = _InputMoments(act_dim, held) if config.recovery.startswith("ridge") else None
        y_mom = _core.Moments(d)
        down = mlp.down_proj
        old_down_bias = down.bias.detach().clone() if down.bias is not None else None

        def mlp_pre(_module, args):
            with timings("statistics"), _context(f"layer {i}, MLP input"):
                in_sq.update(_np(args[0]))

        def down_pre(_module, args):
            a = args[0]
            with timings("statistics"), _context(f"layer {i}, down_proj input"):
                arr = _np(a)
                act_sq.update(arr)
                if act_mom is not None and target is None:
                    act_mom.update(state["chunk"], arr)
            acts.append(a.detach())

        def down_post(_module, _args, out):
            y = out.detach()
            if old_down_bias is not None:
                y = y - old_down_bias
            with timings("statistics"), _context(f"layer {i}, MLP output"):
                y_mom.update(_np(y))
            y_full.append(y)

        handles += [
            mlp.register_forward_pre_hook(mlp_pre),
            down.register_forward_pre_hook(down_pre),
            down.register_forward_hook(down_post),
        ]
    handles.append(attn.register_forward_hook(attn_record))
    try:
        ctx = _override_forward(attn, attn_from_inputs) if prune_heads else _nullcontext()
        with ctx, timings("forward"):
            for c, (x, kw) in enumerate(zip(h, kws)):
                state["chunk"] = c
                block_outs.append(_run_layer(layer, x, kw))
                if prune_channels and act_mom is not None and target is not None:
                    reference, scale = target
                    err = (reference[c].to(block_outs[c]) - block_outs[c]) / scale
                    with timings("statistics"), _context(f"layer {i}, block output error"):
                        act_mom.update(c, np.concatenate([_np(acts[c]), _np(err)], axis=-1))
    finally:
        for hd_ in handles:
            hd_.remove()
    del o_inputs
    if prune_channels:
        in_sq, act_sq, y_mom = reduce.stat(in_sq), reduce.stat(act_sq), reduce.stat(y_mom)
        if act_mom is not None:
            act_mom.combine(reduce)

    if not prune_channels:
        outs = block_outs
    else:
        (gate, gate_rows), (up, up_rows) = (
            adapter.projection(layer, "gate_proj"), adapter.projection(layer, "up_proj")
        )
        w_gate, w_up, w_down = gate.weight[gate_rows], up.weight[up_rows], mlp.down_proj.weight
        w_down64 = _np64(w_down)
        with timings("ranking"), _context(f"layer {i}, channel scores"):
            y_cov = y_mom.covariance()
            gate_s, up_s, down_s = _core.channel_scores(
                in_sq.sum_squares, act_sq.sum_squares, y_cov, _np64(w_gate), _np64(w_up), w_down64
            )
            scores = np.asarray(gate_s) + np.asarray(up_s) + np.asarray(down_s)
            pruned_ch = np.asarray(
                _core.select_channels(scores, p.channels_removed, config.protect_lowest)
            )
        mask = np.ones(Fi, dtype=bool)
        mask[pruned_ch] = False
        kept_ch = np.flatnonzero(mask)
        if len(kept_ch) != Fi - p.channels_removed:
            raise SlimLLMError(f"layer {i}: channel selection does not match the plan")
        pruned_t = torch.as_tensor(pruned_ch, dtype=torch.long, device=w_down.device)
        w_down_pruned = w_down.detach().index_select(1, pruned_t)
        with timings("slicing"):
            slicing.keep_channels(adapter, layer, kept_ch.tolist())
        down = mlp.down_proj
        kept_t = torch.as_tensor(kept_ch, dtype=torch.long, device=acts[0].device)
        y_rec: list = []
        if config.recovery.startswith("ridge"):
            with timings("regression"), _context(f"layer {i}, down_proj recovery"):
                w_fit = w_down64 if target is None else np.hstack([w_down64, np.eye(d)])
                weight, bias, damp = _ridge(act_mom, w_fit, kept_ch, config)
                info["down_proj_ridge_damp"] = damp
                if old_down_bias is not None:
                    bias = bias + _np64(old_down_bias)
            with timings("slicing"):
                slicing.set_linear(down, weight=_tensor_like(np.asarray(weight), down.weight),
                                   bias=_tensor_like(bias, down.weight))
            with timings("forward"):
                for a in acts:
                    y_rec.append(down(a.index_select(-1, kept_t)))
        else:
            # y_K = y_full - (contribution of the pruned channels): r/(1-r) of the work of
            # multiplying the kept channels again
            w_k = down.weight
            pruned_a = pruned_t.to(acts[0].device)
            w_p = w_down_pruned.to(acts[0].device)
            y_pruned = []
            with timings("forward"):
                for a, yf in zip(acts, y_full):
                    y_pruned.append(yf - F.linear(a.index_select(-1, pruned_a), w_p))
            if config.recovery == "affine":
                paired = _core.PairedMoments(d)
                with timings("statistics"), _context(f"layer {i}, pruned vs full MLP output"):
                    for yp, yf in zip(y_pruned, y_full):
                        paired.update(_np(yp), _np(yf))
                paired = reduce.stat(paired)
                with timings("regression"), _context(f"layer {i}, down_proj recovery"):
                    scale, fit_bias = _core.affine_from_paired(paired)
                    scale, fit_bias = np.asarray(scale), np.asarray(fit_bias)
                    if old_down_bias is not None:
                        fit_bias = fit_bias + _np64(old_down_bias)
                new_w = _np64(w_k) * scale[:, None]
                with timings("slicing"):
                    slicing.set_linear(down, weight=_tensor_like(new_w, w_k),
                                       bias=_tensor_like(fit_bias, w_k))
                s_t = _tensor_like(scale, w_k)
                b_t = _tensor_like(fit_bias, w_k)
                y_rec = [yp * s_t + b_t for yp in y_pruned]
            else:
                y_rec = [yp if old_down_bias is None else yp + old_down_bias for yp in y_pruned]
        info["kept_channels"] = kept_ch.tolist()
        del acts, y_full

        # ---- pass 3: block outputs with both parts pruned ---------------------------------------
        def attn_stored(*args, **kwargs):
            return attn_outs[state["chunk"]], None

        def mlp_stored(*args, **kwargs):
            return y_rec[state["chunk"]]

        outs = []
        with _override_forward(attn, attn_stored), _override_forward(mlp, mlp_stored):
            with timings("forward"):
                for c, (x, kw) in enumerate(zip(h, kws)):
                    state["chunk"] = c
                    outs.append(_run_layer(layer, x, kw))

    total, count = 0.0, 0
    for x, y in zip(h, outs):
        s, k = _mean_cos(x, y)
        total, count = total + s, count + k
    total, count = reduce.sum(total, count)
    if not math.isfinite(total):
        raise NonFiniteError(f"layer {i}: non-finite values in the pruned block output")
    info["layer_cosine"] = total / count
    return outs, info


def _o_proj_inputs(layer, attn, h, kws, timings, on_input=None) -> list:
    """The o_proj inputs (b, L, width) of ``layer``'s attention for every chunk of ``h``
    (block inputs, ``kws`` their kwargs), the forward stopped at o_proj; ``on_input(c, x)``
    is called on chunk c's inputs as they arrive (statistics)."""
    inputs: list = []

    def pre(_module, args):
        x = args[0].detach()
        if on_input is not None:
            on_input(len(inputs), x)
        inputs.append(x)
        raise _Stop

    handle = attn.o_proj.register_forward_pre_hook(pre)
    try:
        with timings("forward"):
            for x, kw in zip(h, kws):
                try:
                    _run_layer(layer, x, kw)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return inputs


def _fit_sliced_o_proj(i, layer, attn, h, kws, dense_inputs, w_o, w_o64, cols, config, held,
                       timings, reduce):
    """Pass 1b, the o_proj recovery for families with ``adapter.width_norms`` (OLMo 2): the
    sliced attention (heads already removed, its o_proj not yet refitted) runs on the block
    inputs ``h``; its o_proj inputs x'_K (tokens, |K| h) are fitted against the dense output
    y = x W_o^T of the dense o_proj inputs ``dense_inputs`` (tokens, D) with the dense weight
    ``w_o`` (d, D; ``w_o64`` its float64 numpy copy) and ``cols`` the kept heads' columns.

    - affine: per coordinate y_j ~ alpha_j (x'_K W_K^T)_j + beta_j from ``PairedMoments``;
    - ridge / ridge-delta: :func:`_ridge` on the moments of z = [x'_K, x] ((|K| h + D) dims)
      with the target weight [0, W_o] and the kept columns the first |K| h, ridge-delta
      shrinking toward W_K (held-out split ``held`` for ``ridge_damp="auto"``);
    - none: no fit.

    Returns ``(x'_K per chunk, weight (d, |K| h) float64 or None, bias (d,) float64 or None
    (bias-free fit), damp or None)``. Core errors are prefixed with the layer and tensor.
    """
    sliced = _o_proj_inputs(layer, attn, h, kws, timings)
    w_kept64 = w_o64[:, cols]
    weight = bias = damp = None
    if config.recovery == "affine":
        # float64 outputs: the per-coordinate slopes are as exact as affine_fit_heads' moments
        w_full = w_o.detach().double()
        w_kept = w_full.index_select(1, torch.as_tensor(cols, device=w_o.device))
        paired = _core.PairedMoments(w_o64.shape[0])
        with timings("statistics"), _context(f"layer {i}, sliced vs dense o_proj output"):
            for xs, x in zip(sliced, dense_inputs, strict=True):
                paired.update(_np(F.linear(xs.double(), w_kept)), _np(F.linear(x.double(), w_full)))
        paired = reduce.stat(paired)
        with timings("regression"), _context(f"layer {i}, o_proj recovery"):
            scale, fit_bias = _core.affine_from_paired(paired)
        weight, bias = w_kept64 * np.asarray(scale)[:, None], np.asarray(fit_bias)
    elif config.recovery in ("ridge", "ridge-delta"):
        k = len(cols)
        stats = _InputMoments(k + w_o64.shape[1], held)
        with timings("statistics"), _context(f"layer {i}, sliced and dense o_proj inputs"):
            for c, (xs, x) in enumerate(zip(sliced, dense_inputs, strict=True)):
                stats.update(c, _np(torch.cat([xs, x], dim=-1)))
        stats.combine(reduce)
        w_fit = np.hstack([np.zeros((w_o64.shape[0], k)), w_o64])
        with timings("regression"), _context(f"layer {i}, o_proj recovery"):
            weight, bias, damp = _ridge(stats, w_fit, np.arange(k), config, base=w_kept64)
    return sliced, weight, bias, damp


def _auto_damp(config: PruneConfig) -> bool:
    """Whether the ridge damping is chosen from held-out calibration data."""
    return config.ridge_damp == "auto" and config.recovery.startswith("ridge")


def _held_out_rows(h: list, start: int = 0) -> list:
    """Per calibration chunk of ``h`` (each (sequences, tokens, hidden)), a boolean array over
    its flattened (sequences x tokens) rows: True for the tokens of held-out sequences (global
    sequence index i with i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1; ``start``: the global index
    of the first sequence of ``h``)."""
    rows = []
    for x in h:
        b, t = x.shape[0], x.shape[1]
        seq = np.arange(start, start + b)
        rows.append(np.repeat(seq % HOLDOUT_EVERY == HOLDOUT_EVERY - 1, t))
        start += b
    return rows


class _InputMoments:
    """Moments of a projection's input over the calibration tokens. Without a held-out split
    (``held=None``) one accumulator, ``fit``, sees every row; with one, ``fit`` sees the
    fitting rows and ``held`` the held-out ones, and :meth:`all` merges them."""

    def __init__(self, dim: int, held: list | None):
        self._rows = held
        self.fit = _core.Moments(dim)
        self.held = None if held is None else _core.Moments(dim)
        self._all = None

    def update(self, chunk: int, arr: np.ndarray) -> None:
        """Add the (tokens, dim) rows of calibration chunk ``chunk``."""
        if self.held is None:
            self.fit.update(arr)
            return
        mask = self._rows[chunk]
        for acc, part in ((self.fit, arr[~mask]), (self.held, arr[mask])):
            if len(part):
                acc.update(np.ascontiguousarray(part))

    def combine(self, reduce) -> None:
        """Replace the accumulators by their combination over processes (:class:`_Reduce`)."""
        self.fit = reduce.stat(self.fit)
        if self.held is not None:
            self.held = reduce.stat(self.held)

    def all(self):
        """The ``Moments`` of every row seen (the held-out split merged back)."""
        if self.held is None:
            return self.fit
        if self._all is None:
            self._all = _core.Moments(self.fit.dim)
            self._all.merge(self.fit)
            self._all.merge(self.held)
        return self._all


def _held_out_error(moments, w64: np.ndarray, kept_cols, weight: np.ndarray, bias: np.ndarray,
                   cov: np.ndarray | None = None) -> float:
    """Mean squared reconstruction error of a recovered projection on the rows of ``moments``.

    E ||x_K W'^T + b - x W^T||^2 = tr(A C A^T) + ||A mu + b||^2 with A = W' (on the kept
    columns, zero elsewhere) - W, mu and C the mean and population covariance of ``moments``
    (DESIGN.md section 2).

    Args:
        moments: ``_core.Moments`` of the inputs x (dim D_in).
        w64: the original weight W, float64 (d_out, D_in).
        kept_cols: int indices (|K|,) of the kept input columns, in the order of ``weight``.
        weight: recovered W', float64 (d_out, |K|); bias: b, float64 (d_out,).
        cov: ``moments.covariance()`` if already computed (D_in, D_in).

    Returns:
        the error per token, summed over the d_out outputs (squared units of the output).
    """
    a = -w64
    a[:, np.asarray(kept_cols, dtype=np.int64)] += weight
    c = np.asarray(moments.covariance()) if cov is None else cov
    r = a @ np.asarray(moments.mean()) + bias
    return float(np.einsum("ij,ij->", a @ c, a) + r @ r)


def _ridge(stats: _InputMoments, w64: np.ndarray, kept_cols: np.ndarray, config: PruneConfig,
           base: np.ndarray | None = None):
    """Ridge recovery of a projection ``w64`` (d_out, D_in) restricted to ``kept_cols``.

    ``ridge`` (DESIGN.md section 2): W' = argmin ||x_K W'^T + b - W x||^2 + lam ||W'||^2.
    ``ridge-delta``: W' = B + Delta with Delta = argmin ||x_K Delta^T + b - (W x - B x_K)||^2 +
    lam ||Delta||^2, i.e. the same least squares shrunk toward the original kept weights
    B = ``base`` (d_out, |K|; default W's kept columns, then W x - B x_K = W_P x_P) instead of
    toward zero (identical at lam = 0); computed by the same core call on W with B subtracted
    from the kept columns. With a held-out split (``ridge_damp="auto"``) every damp of
    :data:`RIDGE_DAMP_GRID` is fitted on ``stats.fit``, the one of least
    :func:`_held_out_error` on ``stats.held`` (first on ties) is refitted on all rows.
    Returns float64 (weight (d_out, |K|), bias (d_out,)), bias-free fit, and the damp used.
    """
    kept = np.asarray(kept_cols, dtype=np.int64)
    base = w64[:, kept] if base is None else base
    target = w64
    if config.recovery == "ridge-delta":
        target = w64.copy()
        target[:, kept] -= base

    def fit(moments, damp):
        weight, bias = _core.ridge_reconstruct(moments, target, kept.tolist(), damp)
        weight = np.asarray(weight)
        return (base + weight if config.recovery == "ridge-delta" else weight), np.asarray(bias)

    if stats.held is None:
        return (*fit(stats.fit, config.ridge_damp), config.ridge_damp)
    cov = np.asarray(stats.held.covariance())
    errors = [_held_out_error(stats.held, w64, kept, *fit(stats.fit, d), cov=cov)
              for d in RIDGE_DAMP_GRID]
    damp = RIDGE_DAMP_GRID[int(np.argmin(errors))]
    return (*fit(stats.all(), damp), damp)


@contextmanager
def _nullcontext():
    yield
