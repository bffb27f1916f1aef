"""End to end on the real model: SmolLM2-135M-Instruct (GGUF, dequantised) pruned by 20% of its
parameters through ``python -m slimllm prune``, C4 calibration (32 x 128 tokens), then reloaded.

Checks: the achieved fraction (20.0% +- 0.5%), exact parameter counts, the reloaded model
reproduces the per-layer figures the pipeline measured on its in-memory model (mean cos(h_in,
h_out) of every block over the same calibration tokens), perplexity stays in a sane range and
``generate`` works. Runs in CI (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pruned_smollm2(smollm2_gguf, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-pruned"
    calib = data_dir / "c4" / "c4_sample.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "slimllm", "prune", "--model", str(smollm2_gguf), "--ratio", "0.2",
         "--calib-file", str(calib), "--num-samples", "32", "--seq-len", "128",
         "--output", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout, calib


@pytest.mark.slow
def test_achieved_ratio_and_report(pruned_smollm2):
    out, stdout, calib = pruned_smollm2
    report = json.loads((out / "slimllm_report.json").read_text())
    params = report["parameters"]
    assert params["before"] == 134_515_008
    assert abs(params["achieved_ratio"] - 0.20) <= 0.005
    assert params["after"] == params["counted_after"]
    assert f"{params['achieved_ratio']:.4%}" in stdout
    assert report["calibration"]["num_samples"] == 32 and report["calibration"]["seq_len"] == 128
    assert report["calibration"]["source"] == str(calib)
    assert len(report["layers"]) == 30
    for entry in report["layers"]:
        kept = len(entry["kept_heads"])
        assert kept % 3 == 0 and kept >= 3  # GQA: 9 heads, 3 KV heads, uniform removal
        assert entry["num_heads"][1] == kept
        assert entry["intermediate_size"][1] == len(entry["kept_channels"])
    for stage in ("forward", "statistics", "ranking", "regression", "slicing", "saving", "loading"):
        assert stage in report["timings"]


def _load(out: Path):
    config = json.loads((out / "config.json").read_text())
    if config["model_type"] == "llama":  # one shape for every layer: a stock config
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from slimllm import load_pruned

    return load_pruned(out).eval()


@pytest.mark.slow
def test_reloaded_model_matches_the_pipeline(pruned_smollm2):
    from transformers import PreTrainedTokenizerFast

    from slimllm.pruning.calibration import load_calibration
    from slimllm.pruning.ratios import count_parameters

    out, _, calib_file = pruned_smollm2
    report = json.loads((out / "slimllm_report.json").read_text())
    model = _load(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert count_parameters(model) == report["parameters"]["counted_after"]
    layers = model.model.layers
    for layer, entry in zip(layers, report["layers"]):
        assert layer.self_attn.q_proj.out_features == 64 * entry["num_heads"][1]
        assert layer.mlp.down_proj.in_features == entry["intermediate_size"][1]
        # the affine recovery biases survived (added where something was pruned)
        assert (layer.self_attn.o_proj.bias is not None) == (entry["heads_removed"] > 0)
        assert (layer.mlp.down_proj.bias is not None) == (entry["channels_removed"] > 0)

    # the per-layer cos(h_in, h_out) the pipeline measured on its in-memory pruned model,
    # recomputed on the reloaded model over the same calibration tokens
    calib = load_calibration(tokenizer, calib_file, num_samples=32, seq_len=128, seed=0)
    sums = [0.0] * len(layers)

    def hook(i):
        def record(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            sums[i] += float(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum())

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for chunk in calib.input_ids.split(8):
                model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, entry in enumerate(report["layers"]):
        assert sums[i] / calib.input_ids.numel() == pytest.approx(entry["layer_cosine"], abs=1e-4)

    # sane quality on WikiText-2 (16 windows of 128 tokens; dense SmolLM2 is ~55 on 512)
    text = (Path(calib_file).parent.parent / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tokenizer(text[:200_000], return_tensors="pt").input_ids[0]
    windows = ids[: 16 * 128].reshape(16, 128)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            windows[:, 1:].reshape(-1))
    assert math.exp(float(nll)) < 250

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt.input_ids.shape[1] + 8
    assert tokenizer.decode(gen[0, prompt.input_ids.shape[1]:]).strip()
