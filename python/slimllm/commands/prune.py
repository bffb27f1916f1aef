"""`python -m slimllm prune`: load a model, draw calibration sequences, prune block by block,
save atomically (a thin layer over ``slimllm.pruning.pipeline.prune_model``)."""

from __future__ import annotations

import argparse
import time

EPILOG = """\
ratio allocation (SlimLLM's layer-based ratios): the K blocks whose dense output is most similar to
their input (mean cos(h_in, h_out) over the calibration tokens) are pruned with
r_i = R * K * softmax(alpha * s)_i; R is searched so that exactly --ratio of ALL parameters
(embeddings and lm_head included) is removed, counting the biases the recovery adds.
Clamping: every pruned block keeps at least one query head per KV group and one MLP channel;
a block whose r_i would go past that is clamped (listed under "clamped" in the report) and the
other blocks take up the difference. --layer-ratios is never clamped: a ratio that would leave
a layer without heads or channels is an error.

example:
  python -m slimllm prune --model SmolLM2-135M-Instruct.Q4_1.gguf --ratio 0.2 \\
      --calib-file c4_sample.jsonl --output smollm2-pruned
"""


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _damp(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prune`` (every default shown by ``--help``)."""
    from slimllm.pruning.calibration import FILE_SAMPLES, SELF_BATCH, SELF_SAMPLES
    from slimllm.pruning.pipeline import PruneConfig

    d = PruneConfig.__dataclass_fields__
    parser.epilog = EPILOG

    io = parser.add_argument_group("model and output")
    io.add_argument("--model", required=True,
                    help="model to prune: a Hugging Face folder, a hub id (online) or a .gguf file "
                         "(dequantised to --dtype)")
    io.add_argument("--output", required=True,
                    help="output folder (must not exist or be empty); written to a temporary "
                         "folder and renamed when complete")
    io.add_argument("--resume", action="store_true",
                    help="continue an interrupted run of the same command after its last "
                         "finished block, with identical results; while a run is in progress "
                         "its state is kept in OUTPUT.partial/ (removed once OUTPUT is saved). "
                         "Without a state there, the run starts afresh")
    io.add_argument("--gguf", default=None, metavar="FILE.gguf",
                    help="also write the pruned model as a GGUF file for stock llama.cpp once "
                         "OUTPUT is saved (as `slimllm export OUTPUT --format gguf`; llama, "
                         "mistral and qwen2 families); must not exist")
    io.add_argument("--gguf-outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"],
                    help="type of the 2-D weights in --gguf (1-D tensors stay f32)")
    io.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dtype of the weights kept in memory and of the saved model (default: "
                         "the source dtype: that of the safetensors, float32 for a .gguf; "
                         "float32 for hub ids and slimllm-pruned folders)")
    io.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the block being pruned (HF folders and .gguf files, read "
                         "block by block); only float32 on CPU")
    io.add_argument("--device", default=d["device"].default,
                    help="compute device for the block being pruned: cpu, cuda or cuda:N "
                         "(the rest of the model stays on the CPU)")

    target = parser.add_argument_group("how much to prune")
    target.add_argument("--ratio", type=float, default=None,
                        help="fraction of ALL model parameters to remove, in [0, 1); 0 is a no-op "
                             "(required unless --layer-ratios is given)")
    target.add_argument("--layer-ratios", type=_float_list, default=None, metavar="R0,R1,...",
                        help="explicit per-layer ratios instead of --ratio (one per layer, no "
                             "allocation and no clamping)")
    target.add_argument("--pruned-layers", type=int, default=None, metavar="K",
                        help="prune only the K blocks whose dense output is most similar to "
                             "their input (highest importance s_i; default: all blocks)")
    target.add_argument("--alpha", type=float, default=d["alpha"].default,
                        help="softmax temperature of the per-layer ratio allocation")
    target.add_argument("--channel-multiple", type=int, default=d["channel_multiple"].default,
                        metavar="M", help="remove MLP channels in multiples of M (e.g. 8, 64, 128)")

    method = parser.add_argument_group("method")
    method.add_argument("--head-mode", choices=["uniform", "kv-group"], default=d["head_mode"].default,
                        help="GQA: 'uniform' removes the same number of query heads from every KV "
                             "group; 'kv-group' removes whole KV groups (k/v rows too, smaller KV "
                             "cache). MHA models remove heads with their K/V rows either way")
    method.add_argument("--no-greedy", dest="greedy", action="store_false",
                        help="skip the greedy head swap of the paper's Algorithm 1 (ablation)")
    method.add_argument("--recovery", choices=["affine", "ridge", "ridge-delta", "none"],
                        default=d["recovery"].default,
                        help="output recovery of o_proj/down_proj: 'ridge-delta' (default): "
                             "least squares re-fit of the kept columns shrunk toward the original "
                             "kept weights; 'ridge': the same shrunk toward 0; 'affine': "
                             "per-coordinate affine fit (the paper's); or none. Every mode but "
                             "none adds a bias")
    method.add_argument("--ridge-damp", type=_damp, default=None, metavar="LAMBDA|auto",
                        help="ridge lambda as a fraction of mean(diag C_KK); default 0.01 for "
                             "ridge, auto for ridge-delta; 'auto' picks it per projection by "
                             "the error on held-out calibration sequences (every 4th)")
    method.add_argument("--recovery-target", choices=["projection", "block"],
                        default=d["recovery_target"].default,
                        help="what the down_proj re-fit reproduces: its own dense output "
                             "('projection') or the dense model's block output ('block': it "
                             "also absorbs the attention's and earlier blocks' error); ridge "
                             "modes only")
    method.add_argument("--protect-lowest", type=float, default=d["protect_lowest"].default,
                        help="fraction of lowest-scoring MLP channels kept before pruning the next "
                             "ones (paper quirk; 0 disables)")

    calib = parser.add_argument_group(
        "calibration",
        "One source: --calib-file, --calib-dataset, or --calib self. With none given, the "
        "sequences are sampled from the model itself (self-calibration, no dataset needed).",
    )
    calib.add_argument("--calib", choices=["self"], default=None,
                       help="'self': sample the calibration sequences from the model's own "
                            "distribution (the default when no file or dataset is given)")
    calib.add_argument("--calib-batch-size", type=int, default=SELF_BATCH, metavar="B",
                       help="sequences self-calibration samples at once (the draw depends on it; "
                            "the KV cache holds B x L tokens of every layer)")
    calib.add_argument("--calib-temperature", type=float, default=1.0,
                       help="sampling temperature of --calib self")
    calib.add_argument("--calib-file", default=None,
                       help="calibration text: a plain text file, or .jsonl with a text field per line")
    calib.add_argument("--calib-dataset", default=None, metavar="NAME",
                       help="hub dataset for datasets.load_dataset (streamed; needs network), "
                            "instead of --calib-file")
    calib.add_argument("--calib-config", default=None, help="config name of --calib-dataset")
    calib.add_argument("--calib-split", default="train", help="split of --calib-dataset")
    calib.add_argument("--calib-text-field", default="text",
                       help="text field of .jsonl lines / dataset rows")
    calib.add_argument("--num-samples", type=int, default=None, metavar="N",
                       help="number of calibration sequences (default: "
                            + (f"{FILE_SAMPLES}, from a file, a dataset or self-generated"
                               if FILE_SAMPLES == SELF_SAMPLES else
                               f"{FILE_SAMPLES} from a file or dataset, {SELF_SAMPLES} self-generated") + ")")
    calib.add_argument("--seq-len", type=int, default=128, metavar="L",
                       help="tokens per calibration sequence")
    calib.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw")
    calib.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                       help="calibration sequences per forward chunk")

    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (slimllm's and transformers')")


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first (config, output folder, calibration file), then load,
    calibrate, prune, save; prints the achieved fraction. Errors are SlimLLMError subclasses."""
    import os
    import sys
    from pathlib import Path

    from slimllm.pruning.calibration import (
        FILE_SAMPLES,
        SELF_SAMPLES,
        load_calibration,
        read_documents,
        self_generated,
    )
    from slimllm.io.checkpoint import check_output_folder
    from slimllm.errors import CalibrationError, CheckpointError, ConfigError
    from slimllm.pruning.pipeline import PruneConfig

    config = PruneConfig(
        ratio=args.ratio,
        layer_ratios=args.layer_ratios,
        pruned_layers=args.pruned_layers,
        alpha=args.alpha,
        head_mode=args.head_mode,
        greedy=args.greedy,
        recovery=args.recovery,
        ridge_damp=args.ridge_damp,
        recovery_target=args.recovery_target,
        protect_lowest=args.protect_lowest,
        channel_multiple=args.channel_multiple,
        device=args.device,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer, got {args.threads}")
    from slimllm.errors import DistributedError
    from slimllm.pruning.distributed import from_environment

    dist = from_environment(config.device)  # torchrun with several processes, else None
    if dist is not None and args.resume:
        raise DistributedError("--resume is not supported with several processes (torchrun)")
    output = Path(os.path.expanduser(args.output))
    check_output_folder(output)
    gguf_file = None if args.gguf is None else Path(os.path.expanduser(args.gguf)).absolute()
    if gguf_file is not None and (gguf_file.exists() or not gguf_file.parent.is_dir()):
        what = "already exists" if gguf_file.exists() else "is in a folder that does not exist"
        raise CheckpointError(f"--gguf {gguf_file} {what}")
    state_dir = output.with_name(output.name + ".partial")
    if state_dir.exists() and not args.resume:
        raise CheckpointError(
            f"{state_dir} holds the state of an interrupted run: add --resume to continue it, "
            f"or delete it to start over"
        )
    sources = [s for s in (args.calib, args.calib_file, args.calib_dataset) if s is not None]
    if len(sources) > 1:
        raise CalibrationError(
            "give one calibration source: --calib self, --calib-file or --calib-dataset"
        )
    self_calibration = not sources or args.calib == "self"
    if args.num_samples is None:
        args.num_samples = SELF_SAMPLES if self_calibration else FILE_SAMPLES
    if args.calib_file is not None:
        read_documents(args.calib_file, args.calib_text_field)  # fail before loading the model
    if args.num_samples < 1 or args.seq_len < 1 or args.calib_batch_size < 1:
        raise CalibrationError("--num-samples, --seq-len and --calib-batch-size must be positive")

    from slimllm.io.checkpoint import load_model, remove_interrupted_saves, save_pruned
    from slimllm.io.streaming import save_pruned_from_state
    from slimllm.pruning.pipeline import prune_model
    from slimllm.pruning.resume import STATE_NAME, PruneState

    state = PruneState.open(state_dir)  # not a state folder: fail before loading the model
    if dist is not None:
        dist.barrier()  # every rank has checked the output folders before rank 0 writes any
    if state.resumable:  # other settings: refuse now; model and calibration after loading
        state.check({"config": config.to_dict()})
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if not args.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    from slimllm.io.lazy import open_lazy, supports_lazy

    t0 = time.perf_counter()
    lazy = None
    if supports_lazy(args.model):  # block by block: weights read when their block is reached
        lazy, tokenizer = open_lazy(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype,
                                    device=config.device)
        model = lazy.model
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype or "float32", device="cpu")
    t_load = time.perf_counter() - t0
    if gguf_file is not None:  # refuse before pruning, not after
        from slimllm.families.adapters import get_adapter
        from slimllm.io.gguf_export import check_exportable

        check_exportable(get_adapter(model).name, model.config, "--gguf")

    t0 = time.perf_counter()
    if self_calibration:
        # generation needs the whole model: with a lazy source it is loaded in its source dtype
        # (that much memory), used and freed before the block walk
        generator = model if lazy is None else load_model(args.model, dtype=lazy.source_dtype)[0]
        calib = self_generated(
            generator.to(config.device),
            tokenizer,
            args.num_samples,
            args.seq_len,
            args.seed,
            batch_size=args.calib_batch_size,
            temperature=args.calib_temperature,
            progress=args.progress,
        )
        generator.to("cpu")
        del generator
    else:
        calib = load_calibration(
            tokenizer,
            calib_file=args.calib_file,
            dataset=args.calib_dataset,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            seed=args.seed,
            text_field=args.calib_text_field,
            dataset_config=args.calib_config,
            dataset_split=args.calib_split,
        )
    t_calib = time.perf_counter() - t0
    if dist is not None:
        dist.same_tokens(calib.input_ids)

    manifest = state_dir / STATE_NAME
    recorded = manifest.stat().st_mtime_ns if manifest.is_file() else None
    try:
        model, report = prune_model(model, tokenizer, calib, config, lazy=lazy, dist=dist,
                                    state_dir=state_dir if dist is None or dist.rank == 0 else None)
    except (Exception, KeyboardInterrupt):
        if manifest.is_file() and manifest.stat().st_mtime_ns != recorded:  # progress was kept
            print(f"slimllm prune: the finished blocks are kept in {state_dir}; rerun the same "
                  f"command with --resume to continue", file=sys.stderr)
        raise
    report["model"] = str(args.model)
    report["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    report["timings"]["loading"] = round(t_load, 6)
    report["timings"]["calibration_data"] = round(t_calib, 6)

    if dist is not None and dist.rank != 0:  # rank 0 writes the output
        dist.barrier()
        return 0
    t0 = time.perf_counter()
    if args.resume:
        remove_interrupted_saves(output)
    state = PruneState.open(state_dir)  # as prune_model left it
    if state.resumable:  # streaming save: the block files of the state are the output's shards
        save_pruned_from_state(model, tokenizer, output, report, state)
    else:  # nothing was pruned (ratio 0): no state was written
        save_pruned(model, tokenizer, output, report)
    state.remove()
    t_save = time.perf_counter() - t0
    report["timings"]["saving"] = round(t_save, 6)
    _rewrite_report(output, report)

    if gguf_file is not None:
        from slimllm.io.gguf_export import export_gguf

        t0 = time.perf_counter()
        export_gguf(output, gguf_file, outtype=args.gguf_outtype)
        print(f"wrote {gguf_file} ({args.gguf_outtype}) in {time.perf_counter() - t0:.1f} s")

    params = report["parameters"]
    after = params.get("counted_after", params["after"])
    target = "per-layer ratios" if config.ratio is None else f"target {config.ratio:.2%}"
    print(
        f"removed {params['before'] - after:,} of {params['before']:,} parameters: achieved "
        f"ratio {params['achieved_ratio']:.4%} ({target})"
    )
    resumed = report.get("resumed_from_block")
    if resumed is not None:
        restored = f"blocks 0-{resumed - 1}" if resumed else "the dense pass"
        print(f"resumed at block {resumed}: {restored} came from {state_dir}")
    print(
        f"load {t_load:.1f} s, calibration data {t_calib:.1f} s, prune "
        f"{report['timings']['total']:.1f} s, save {t_save:.1f} s; saved to {output}"
    )
    if dist is not None:
        dist.barrier()
    return 0


def _rewrite_report(output, report: dict) -> None:
    """Add the saving time to the saved report (atomic replace of that one file)."""
    import json
    import os

    from slimllm.io.checkpoint import REPORT_NAME

    path = output / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
