"""`python -m slimllm inspect` and slimllm.evaluation.inspection: per-layer shapes and parameter counts read
from config.json + safetensors headers must equal the model's actual parameters (numel in
memory); the report summary; the PNG; typed errors for bad folders."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from slimllm.io import checkpoint
from slimllm.pruning import slicing
from slimllm.families.adapters import get_adapter
from slimllm.cli import main
from slimllm.errors import CheckpointError, ConfigError
from slimllm.evaluation.inspection import format_info, inspect_folder, plot_info, summarize_report
from slimllm.pruning.ratios import count_parameters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report(model, dense_shapes, kept_shapes) -> dict:
    """A small report in the pipeline's format (parameters, config, calibration, layers,
    timings)."""
    after = count_parameters(model)
    before = after + 10_000
    return {
        "method": "SlimLLM test",
        "model": "tiny-llama",
        "dtype": "float32",
        "architecture": "llama",
        "num_layers": len(kept_shapes),
        "config": {"ratio": 0.25, "recovery": "affine", "head_mode": "kv-group", "greedy": True},
        "calibration": {
            "source": "unit-test.txt",
            "kind": "text",
            "num_samples": 4,
            "seq_len": 16,
            "seed": 0,
        },
        "parameters": {
            "before": before,
            "after": after,
            "removed": before - after,
            "target_ratio": 0.25,
            "achieved_ratio": (before - after) / before,
            "counted_after": after,
        },
        "base_ratio": 0.3,
        "layers": [
            {
                "index": i,
                "importance": 0.8 + 0.05 * i,
                "ratio": 0.1 * (i + 1),
                "clamped": ["heads"] if i == 2 else [],
                "num_heads": [d[0], k[0]],
                "num_kv_heads": [d[1], k[1]],
                "intermediate_size": [d[2], k[2]],
                "layer_cosine": 0.7 + 0.05 * i,
                "cos_vs_dense_output": 0.99 - 0.01 * i,
            }
            for i, (d, k) in enumerate(zip(dense_shapes, kept_shapes, strict=True))
        ],
        "timings": {"forward": 1.5, "statistics": 0.25, "total": 2.0},
    }


def _memory_counts(model) -> list[tuple[int, int, int]]:
    """(attention, mlp, other) parameter numel of every decoder layer of an in-memory model."""
    out = []
    for layer in get_adapter(model).layers(model):
        attn = sum(p.numel() for p in layer.self_attn.parameters())
        mlp = sum(p.numel() for p in layer.mlp.parameters())
        out.append((attn, mlp, sum(p.numel() for p in layer.parameters()) - attn - mlp))
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    """A 3-layer Llama (4 heads / 2 KV heads, 96 channels, untied) pruned to a different shape
    per layer, with recovery biases on layer 2, saved with a report: (folder, model)."""
    model = make_tiny_model("llama", layers=3, tied=False, seed=1)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    slicing.keep_heads(adapter, layers[0], [0, 2])  # uniform GQA: one head per KV group
    slicing.keep_channels(adapter, layers[1], list(range(0, 96, 2))[:40])
    slicing.keep_heads(adapter, layers[2], [2, 3], kept_kv_heads=[1])  # a whole KV group gone
    slicing.keep_channels(adapter, layers[2], list(range(64)))
    slicing.set_linear(adapter.attention(layers[2]).o_proj, bias=torch.randn(64))
    slicing.set_linear(adapter.mlp(layers[2]).down_proj, bias=torch.randn(64))
    dense = [(4, 2, 96)] * 3
    kept = [(2, 2, 96), (4, 2, 40), (2, 1, 64)]
    folder = tmp_path_factory.mktemp("inspect") / "pruned"
    checkpoint.save_pruned(model, tiny_tokenizer, folder, _report(model, dense, kept))
    return folder, model


def test_pruned_counts_equal_memory(pruned):
    folder, model = pruned
    info = inspect_folder(folder)
    assert info.config_format == "per-layer" and info.family == "llama"
    assert [
        (x.num_heads, x.num_kv_heads, x.head_dim, x.intermediate_size) for x in info.layers
    ] == [
        (2, 2, 16, 96),
        (4, 2, 16, 40),
        (2, 1, 16, 64),
    ]
    assert [
        (x.attention_params, x.mlp_params, x.norm_params) for x in info.layers
    ] == _memory_counts(model)
    assert info.layers[2].biases == ("o_proj", "down_proj")
    assert info.embedding_params == model.model.embed_tokens.weight.numel()
    assert not info.tied_embeddings and info.lm_head_params == model.lm_head.weight.numel()
    assert info.other_params == model.model.norm.weight.numel()
    assert info.total_params == count_parameters(model)
    assert info.layer_params == sum(p.numel() for p in model.model.layers.parameters())
    # the dense shapes come from the report: fraction of projection weights removed
    d, h = 64, 16
    dense_w = (2 * 4 * h + 2 * 2 * h + 3 * 96) * d
    kept_w = (2 * 4 * h + 2 * 2 * h + 3 * 40) * d
    assert info.layers[1].removed_fraction(d) == pytest.approx(1 - kept_w / dense_w)
    assert info.warnings == []
    # and the loaded model agrees too
    loaded = checkpoint.load_pruned(folder)
    assert _memory_counts(loaded) == _memory_counts(model)
    assert count_parameters(loaded) == info.total_params


def test_cli_json_and_table(pruned, capsys):
    folder, model = pruned
    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == count_parameters(model)
    counts = [(e["attention_params"], e["mlp_params"], e["norm_params"]) for e in data["layers"]]
    assert counts == _memory_counts(model)
    assert [e["params"] for e in data["layers"]] == [sum(c) for c in _memory_counts(model)]
    rep = data["report"]
    assert rep["target_ratio"] == 0.25
    assert rep["achieved_ratio"] == pytest.approx(10_000 / (count_parameters(model) + 10_000))
    assert [e["importance"] for e in rep["layers"]] == pytest.approx([0.8, 0.85, 0.9])
    assert rep["calibration"]["source"] == "unit-test.txt"
    assert rep["timings"]["total"] == 2.0

    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"total           {count_parameters(model):,}" in out
    rows = {
        line.split()[0]: line.split() for line in out.splitlines() if line[:5].strip().isdigit()
    }
    assert rows["2"][1:5] == ["4->2", "2->1", "16", "96->64"]
    assert "target ratio 25.00%" in out
    assert "calibration: source=unit-test.txt" in out
    assert "timings (s): forward 1.50, statistics 0.25, total 2.00" in out
    assert "untied (384 x 64)" in out


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_png(pruned, tmp_path, capsys):
    folder, _ = pruned
    target = tmp_path / "layers.png"
    assert main(["inspect", str(folder), "--plot", str(target)]) == 0
    assert "wrote" in capsys.readouterr().err
    width, height = _png_size(target)
    assert width >= 600 and height >= 600
    assert target.stat().st_size > 20_000  # three panels of bars and lines, not a blank image
    assert not list(tmp_path.glob(".*tmp"))


def test_plot_errors(pruned, tmp_path, monkeypatch, capsys):
    folder, _ = pruned
    assert main(["inspect", str(folder), "--plot", str(tmp_path / "x.pdf")]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert main(["inspect", str(folder), "--plot", str(tmp_path / "nope" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["inspect", str(folder), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "matplotlib" in err
    with pytest.raises(ConfigError, match="matplotlib"):
        plot_info(inspect_folder(folder), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_dense_folder(make_tiny_model, tiny_tokenizer, tmp_path, capsys):
    model = make_tiny_model("qwen2", num_heads=4, num_kv_heads=2, layers=2, tied=True)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    info = inspect_folder(folder)
    assert info.config_format == "stock" and info.family == "qwen2" and info.report is None
    assert [(x.num_heads, x.num_kv_heads, x.intermediate_size) for x in info.layers] == [
        (4, 2, 96)
    ] * 2
    assert [x.biases for x in info.layers] == [("q_proj", "k_proj", "v_proj")] * 2
    assert [
        (x.attention_params, x.mlp_params, x.norm_params) for x in info.layers
    ] == _memory_counts(model)
    assert info.tied_embeddings and info.lm_head_params == 0
    assert info.total_params == count_parameters(model)
    assert all(x.removed_fraction(64) is None for x in info.layers)
    text = format_info(info)
    assert "no slimllm_report.json" in text and "tied to the embeddings" in text
    png = tmp_path / "dense.png"
    assert main(["inspect", str(folder), "--plot", str(png)]) == 0
    assert "no slimllm_report.json" in capsys.readouterr().out
    assert _png_size(png)[0] >= 600


def test_stock_pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path):
    """Uniform shapes: save_pruned writes a stock config; counts equal the loaded model."""
    model = make_tiny_model("qwen3", layers=2, tied=True)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        slicing.keep_heads(adapter, layer, [1, 3])
        slicing.keep_channels(adapter, layer, list(range(48)))
    folder = tmp_path / "stock"
    checkpoint.save_pruned(model, tiny_tokenizer, folder, {})
    info = inspect_folder(folder)
    assert info.config_format == "stock" and info.model_type == "qwen3"
    assert [(x.num_heads, x.num_kv_heads, x.intermediate_size) for x in info.layers] == [
        (2, 2, 48)
    ] * 2
    # qwen3's q_norm/k_norm (size head_dim) count as attention parameters
    assert [
        (x.attention_params, x.mlp_params, x.norm_params) for x in info.layers
    ] == _memory_counts(model)
    assert (
        info.total_params
        == count_parameters(model)
        == count_parameters(checkpoint.load_pruned(folder))
    )
    assert info.report == summarize_report({})


def test_real_pipeline_report(make_tiny_model, tiny_tokenizer, tmp_path):
    """The report prune_model writes is read: ratios, per-layer importance, kept counts."""
    from slimllm.pruning.pipeline import PruneConfig, prune_model

    model = make_tiny_model("llama", layers=3)
    calib = torch.randint(
        0, len(tiny_tokenizer), (4, 16), generator=torch.Generator().manual_seed(0)
    )
    model, report = prune_model(
        model, tiny_tokenizer, calib, PruneConfig(ratio=0.2, progress=False)
    )
    folder = tmp_path / "real"
    checkpoint.save_pruned(model, tiny_tokenizer, folder, report)
    info = inspect_folder(folder)
    assert info.warnings == []
    rep = info.report
    assert rep["target_ratio"] == pytest.approx(0.2)
    assert rep["achieved_ratio"] == pytest.approx(report["parameters"]["achieved_ratio"])
    expected = [e["importance"] for e in report["layers"]]
    assert [e["importance"] for e in rep["layers"]] == pytest.approx(expected)
    assert [e["ratio"] for e in rep["layers"]] == pytest.approx(
        [e["ratio"] for e in report["layers"]]
    )
    assert [(x.num_heads, x.intermediate_size) for x in info.layers] == [
        (e["num_heads"][1], e["intermediate_size"][1]) for e in report["layers"]
    ]
    assert [
        (x.attention_params, x.mlp_params, x.norm_params) for x in info.layers
    ] == _memory_counts(model)
    assert "achieved" in format_info(info)


def test_report_tolerance(pruned, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(pruned[0], folder)
    report = folder / checkpoint.REPORT_NAME
    report.write_text(
        json.dumps({"layers": [{"index": 0}, {"index": 1, "ratio": "x"}], "timings": {}})
    )
    info = inspect_folder(folder)
    assert info.report["target_ratio"] is None and info.report["layers"][1]["ratio"] is None
    assert "per-layer" in format_info(info)
    plot_info(info, tmp_path / "partial.png")
    report.write_text("{not json")
    info = inspect_folder(folder)
    assert info.report is None and "ignored" in info.warnings[0]
    # the report's kept counts disagree with the weights: a warning, not an error
    report.write_text(json.dumps({"layers": [{"index": 0, "num_heads": [4, 3]}]}))
    assert any("keeps 3 heads" in w for w in inspect_folder(folder).warnings)


def test_errors(pruned, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "CheckpointError" in err and str(missing) in err
    with pytest.raises(CheckpointError, match="no such model folder"):
        inspect_folder(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        inspect_folder(empty)
    with pytest.raises(CheckpointError, match="not a model folder"):
        inspect_folder(pruned[0] / "config.json")

    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(pruned[0], corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # header cut short
    assert main(["inspect", str(corrupt)]) == 2
    assert "CheckpointError" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="corrupt"):
        inspect_folder(corrupt)

    mismatch = tmp_path / "mismatch"
    shutil.copytree(pruned[0], mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["slimllm_layers"][1]["intermediate_size"] = 41
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="layer 1: config.json says 4 heads, 2 KV heads, 41 channels"
    ):
        inspect_folder(mismatch)


def test_sharded_dense_folder(make_tiny_model, tmp_path):
    """Shards listed by model.safetensors.index.json are all read; a missing shard is an error."""
    model = make_tiny_model("mistral", layers=3, tied=False)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    info = inspect_folder(folder)
    assert len(info.weight_files) > 1
    assert info.total_params == count_parameters(model)
    assert [
        (x.attention_params, x.mlp_params, x.norm_params) for x in info.layers
    ] == _memory_counts(model)
    sorted(folder.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        inspect_folder(folder)
