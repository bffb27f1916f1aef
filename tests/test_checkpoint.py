"""Loading and atomic saving (slimllm.io.checkpoint): round trips with exact logits for the stock
and the per-layer (remote code) configs, recovery biases, atomicity, typed errors, GGUF."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_ARCHS
import slimllm
from slimllm.io import checkpoint
from slimllm.families.adapters import get_adapter
from slimllm.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from slimllm.pruning.slicing import keep_channels, keep_heads, set_linear

IDS = torch.tensor([[5, 17, 42, 3, 99, 250, 7, 1, 64, 128, 33, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _prune(model, *, uniform, biases=True, seed=0, heads_per_group=1):
    """Prune every layer (GQA uniform mode) and add random recovery biases/scales to
    o_proj/down_proj; uniform=False gives every layer a different shape."""
    adapter = get_adapter(model)
    rng = np.random.default_rng(seed)
    for idx, layer in enumerate(adapter.layers(model)):
        shape = adapter.layer_shape(layer)
        group = shape.num_heads // shape.num_kv_heads
        keep = heads_per_group if uniform else max(1, group - idx % group)
        kept = [
            g * group + int(a)
            for g in range(shape.num_kv_heads)
            for a in sorted(rng.choice(group, keep, replace=False))
        ]
        if not uniform and idx % 2 and shape.num_kv_heads > 1:
            kept_kv = list(range(shape.num_kv_heads - 1))
            kept = [a for a in kept if a // group in kept_kv]
            keep_heads(adapter, layer, kept, kept_kv_heads=kept_kv)
        else:
            keep_heads(adapter, layer, kept)
        n_channels = shape.intermediate_size // 2 if uniform else shape.intermediate_size - 8 * (idx + 1)
        channels = rng.choice(shape.intermediate_size, n_channels, replace=False)
        keep_channels(adapter, layer, sorted(int(c) for c in channels))
        if biases:
            for linear in (adapter.attention(layer).o_proj, adapter.mlp(layer).down_proj):
                d = linear.out_features
                scale = torch.tensor(rng.uniform(0.5, 1.5, d), dtype=torch.float32)
                set_linear(linear, weight=linear.weight.detach() * scale[:, None], bias=rng.normal(0, 0.1, d))
    return model


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        assert key in sb, key
        assert torch.equal(value, sb[key]), key


def _config(path):
    return json.loads((Path(path) / "config.json").read_text())


# ----------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_uniform_llama_saves_stock_config_with_recovery_biases(make_tiny_model, tiny_tokenizer, tmp_path, tied):
    model = _prune(make_tiny_model("llama", num_heads=4, num_kv_heads=2, tied=tied, layers=3), uniform=True)
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "pruned", {"ratio": 0.5, "arr": np.arange(3)})
    assert out == (tmp_path / "pruned").absolute()
    config = _config(out)
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16 and config["intermediate_size"] == 48
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert config["tie_word_embeddings"] is tied
    assert not (out / checkpoint.REMOTE_CODE_NAME).exists()
    assert json.loads((out / checkpoint.REPORT_NAME).read_text()) == {"ratio": 0.5, "arr": [0, 1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain, no remote code
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(_logits(reloaded), expected)
    _assert_same_weights(model, reloaded)  # o_proj / down_proj recovery biases included
    layer = reloaded.model.layers[1]
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
    assert torch.count_nonzero(layer.self_attn.q_proj.bias) == 0  # zero biases for the stock layout
    assert torch.count_nonzero(layer.mlp.gate_proj.bias) == 0

    for loaded in (checkpoint.load_pruned(out), checkpoint.load_model(out)[0]):
        assert torch.equal(_logits(loaded), expected)
    _, tokenizer = checkpoint.load_model(out)
    assert tokenizer("quick brown fox")["input_ids"] == tiny_tokenizer("quick brown fox")["input_ids"]


def test_uniform_llama_without_biases_keeps_stock_bias_flags(make_tiny_model, tiny_tokenizer, tmp_path):
    model = _prune(make_tiny_model("llama", num_heads=8, num_kv_heads=2), uniform=True, biases=False, heads_per_group=2)
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    config = _config(out)
    assert config["model_type"] == "llama"
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["num_attention_heads"] == 4 and config["head_dim"] == 16
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(out)), expected)


def test_uniform_qwen2_without_recovery_biases_is_stock(make_tiny_model, tiny_tokenizer, tmp_path):
    model = _prune(make_tiny_model("qwen2", num_heads=4, num_kv_heads=2), uniform=True, biases=False)
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    config = _config(out)
    assert config["model_type"] == "qwen2" and config["head_dim"] == 16 and config["num_attention_heads"] == 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(reloaded), expected)
    _assert_same_weights(model, reloaded)  # q/k/v biases sliced and saved


def _check_per_layer(model, tokenizer, out, expected):
    config = _config(out)
    assert config["model_type"].startswith("slimllm_")
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_slimllm.")
    assert (out / checkpoint.REMOTE_CODE_NAME).is_file()
    adapter = get_adapter(model)
    layers = config["slimllm_layers"]
    assert len(layers) == len(adapter.layers(model))
    for entry, shape in zip(layers, adapter.layer_shapes(model), strict=True):
        assert (entry["num_heads"], entry["num_kv_heads"], entry["head_dim"], entry["intermediate_size"]) == (
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            shape.intermediate_size,
        )
    with pytest.raises((ValueError, OSError, KeyError)):  # stock loading refuses, it does not guess
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)

    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    asked: list = []  # transformers' "run the custom code? [y/N]" prompt reads input()
    with mock.patch("builtins.input", side_effect=lambda *a: asked.append(a) or "n"):
        pruned = slimllm.load_pruned(out)
        own_tok = slimllm.load_tokenizer(out)
        loaded, tok = checkpoint.load_model(out)
    assert not asked  # no remote code is run, so nobody is asked about it
    with mock.patch("builtins.input", side_effect=lambda *a: asked.append(a) or "n"):
        transformers.AutoTokenizer.from_pretrained(out)
    assert asked  # the prompt load_tokenizer avoids: the test would see it if it came back
    for reloaded in (pruned, remote, loaded):
        assert torch.equal(_logits(reloaded), expected)
        _assert_same_weights(model, reloaded)
        assert get_adapter(reloaded).layer_shapes(reloaded) == adapter.layer_shapes(model)
    assert type(remote).__module__.startswith("transformers_modules")  # really the copied file
    out_ids = pruned.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out_ids.shape == (1, 8)
    assert tok("lazy dog")["input_ids"] == tokenizer("lazy dog")["input_ids"]
    assert own_tok("lazy dog")["input_ids"] == tokenizer("lazy dog")["input_ids"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", [(4, 2), (4, 4)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_non_uniform_round_trip(make_tiny_model, tiny_tokenizer, tmp_path, arch, layout, tied):
    model = make_tiny_model(arch, num_heads=layout[0], num_kv_heads=layout[1], tied=tied, layers=3)
    model = _prune(model, uniform=False, seed=TINY_ARCHS.index(arch))
    shapes = get_adapter(model).layer_shapes(model)
    assert len(set(shapes)) > 1
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {"arch": arch})
    _check_per_layer(model, tiny_tokenizer, out, expected)
    biases = _config(out)["slimllm_layers"][0]["bias"]
    assert "o_proj" in biases and "down_proj" in biases
    if arch == "qwen2":
        assert {"q_proj", "k_proj", "v_proj"} <= set(biases)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_per_layer_folder_with_bad_layer_shape_is_a_checkpoint_error(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    """A per-layer config.json whose layer 1 lists 3 query heads over 2 KV heads does not load:
    the error names the layer entry and what is wrong with it."""
    model = _prune(make_tiny_model(arch, layers=3), uniform=False, seed=TINY_ARCHS.index(arch))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {"arch": arch})
    config = _config(out)
    config["slimllm_layers"][1].update(num_heads=3, num_kv_heads=2)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"slimllm_layers\[1\]: 3 query heads are not a multiple of 2"):
        checkpoint.load_pruned(out)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"])
def test_uniform_with_biases_the_stock_family_lacks_uses_per_layer(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    model = _prune(make_tiny_model(arch, num_heads=4, num_kv_heads=2), uniform=True)
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert _config(out)["model_type"] == f"slimllm_{arch}"
    _check_per_layer(model, tiny_tokenizer, out, expected)


def test_uniform_shape_the_stock_config_rejects_uses_per_layer(make_tiny_model, tiny_tokenizer, tmp_path):
    """3 heads do not divide hidden_size 64: LlamaConfig refuses them, so per-layer it is."""
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=4)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        keep_heads(adapter, layer, [0, 1, 3])
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert _config(out)["model_type"] == "slimllm_llama"
    assert _config(out)["num_attention_heads"] == 4  # the dense template, valid for the stock checks
    _check_per_layer(model, tiny_tokenizer, out, expected)


def test_pruning_a_pruned_model_again(make_tiny_model, tiny_tokenizer, tmp_path):
    model = _prune(make_tiny_model("qwen3", num_heads=8, num_kv_heads=2), uniform=False)
    first = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "first", {})
    again = checkpoint.load_pruned(first)
    adapter = get_adapter(again)
    layer = adapter.layers(again)[0]
    shape = adapter.layer_shape(layer)
    keep_channels(adapter, layer, list(range(shape.intermediate_size - 4)))
    expected = _logits(again)
    second = checkpoint.save_pruned(again, tiny_tokenizer, tmp_path / "second", {})
    assert _config(second)["slimllm_layers"][0]["intermediate_size"] == shape.intermediate_size - 4
    assert torch.equal(_logits(checkpoint.load_pruned(second)), expected)


def test_bfloat16_round_trip(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    rotary = {name: buf.clone() for name, buf in model.model.rotary_emb.named_buffers()}
    model.to(torch.bfloat16)
    for name, buf in rotary.items():  # .to() casts the rotary buffers; from_pretrained keeps them f32
        setattr(model.model.rotary_emb, name, buf)
    model = _prune(model, uniform=False)
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert _config(out)["dtype"] == "bfloat16"
    reloaded = checkpoint.load_pruned(out, dtype="bfloat16")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(_logits(reloaded), expected)


# ----------------------------------------------------------------------------------------------
# atomic save


def test_disk_full_mid_save_leaves_nothing(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_full)
    model = _prune(make_tiny_model("llama"), uniform=False)
    with pytest.raises(CheckpointError, match="disk full"):
        checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_failure_after_weights_leaves_nothing(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", broken)
    (tmp_path / "out").mkdir()  # an existing empty folder is fine and stays as it was
    with pytest.raises(CheckpointError, match="tokenizer exploded"):
        checkpoint.save_pruned(make_tiny_model("mistral"), tiny_tokenizer, tmp_path / "out", {})
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and list((tmp_path / "out").iterdir()) == []


def test_existing_non_empty_output_is_refused(make_tiny_model, tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="is a folder that is not empty"):
        checkpoint.save_pruned(make_tiny_model("llama"), tiny_tokenizer, out, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        checkpoint.save_pruned(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "file", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_saved_files_get_the_usual_permissions(make_tiny_model, tiny_tokenizer, tmp_path):
    """The output is readable like any folder the user makes (0o755 / 0o644 under umask 022),
    although it was written to a private temporary folder."""
    old = os.umask(0o022)
    try:
        out = checkpoint.save_pruned(_prune(make_tiny_model("llama"), uniform=False),
                                     tiny_tokenizer, tmp_path / "out", {})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_unserialisable_report_is_refused_before_writing(make_tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.save_pruned(make_tiny_model("llama"), tiny_tokenizer, tmp_path / "out", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_empty_existing_output_folder_is_used(make_tiny_model, tiny_tokenizer, tmp_path):
    (tmp_path / "out").mkdir()
    model = make_tiny_model("qwen3")
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    assert (out / "config.json").is_file() and oct(out.stat().st_mode & 0o777) == "0o755"


# ----------------------------------------------------------------------------------------------
# typed errors on load


@pytest.fixture
def saved(make_tiny_model, tiny_tokenizer, tmp_path):
    model = _prune(make_tiny_model("llama"), uniform=False)
    return checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "saved", {})


@pytest.mark.parametrize("loader", ["load_model", "load_pruned"])
def test_truncated_safetensors(saved, loader):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        getattr(checkpoint, loader)(saved)


@pytest.mark.parametrize("loader", ["load_model", "load_pruned"])
def test_garbage_safetensors(saved, loader):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        getattr(checkpoint, loader)(saved)


@pytest.mark.parametrize("loader", ["load_model", "load_pruned"])
def test_missing_safetensors(saved, loader):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights"):
        getattr(checkpoint, loader)(saved)


def test_missing_shard_named_by_index(saved):
    (saved / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_model(saved)


def test_weights_that_do_not_match_the_config(saved):
    config = _config(saved)
    config["slimllm_layers"][0]["intermediate_size"] += 8
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="could not load|does not match"):
        checkpoint.load_pruned(saved)


def test_missing_tensor_is_an_error_not_a_random_init(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.bias"]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load_model(saved)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", "{}"])
def test_missing_or_corrupt_config(saved, content):
    if content is None:
        (saved / "config.json").unlink()
    else:
        (saved / "config.json").write_text(content)
    with pytest.raises(CheckpointError):
        checkpoint.load_model(saved)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        checkpoint.load_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nothing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint.load_model(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError):
        checkpoint.load_pruned(tmp_path / "nothing")


def test_bad_dtype_and_device(saved):
    with pytest.raises(ConfigError, match="dtype"):
        checkpoint.load_model(saved, dtype="int8")
    with pytest.raises(ConfigError, match="device"):
        checkpoint.load_model(saved, device="nonsense")
    assert checkpoint.resolve_dtype("bf16") is torch.bfloat16
    assert checkpoint.resolve_dtype(torch.float16) is torch.float16


def test_unsupported_architecture_folder_fails_before_reading_weights(tmp_path):
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*gemma, gemma2, gemma3_text, granite, llama, mistral, olmo2, phi3, qwen2, qwen3"):
        checkpoint.load_model(tmp_path / "gpt2")
    (tmp_path / "gpt2" / "model.safetensors").unlink()  # nothing heavy is read first
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        checkpoint.load_model(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        checkpoint.load_pruned(tmp_path / "gpt2")


def test_unsupported_architecture_on_save():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        checkpoint.save_pruned(model, None, "/nonexistent/never/created", {})
    assert not Path("/nonexistent").exists()


def test_hub_id_errors(tmp_path, monkeypatch):
    import transformers.utils

    def offline(repo_id, filename, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.utils, "cached_file", offline)
    with pytest.raises(CheckpointError, match="hub"):
        checkpoint.load_model("some-org/some-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phimoe"}))
    monkeypatch.setattr(transformers.utils, "cached_file", lambda *a, **k: str(tmp_path / "config.json"))
    with pytest.raises(UnsupportedArchitectureError, match="'phimoe'"):
        checkpoint.load_model("some-org/some-model")


# ----------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path, arch):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["gpt2", "rwkv7x"])
def test_gguf_of_another_architecture(tmp_path, arch):
    """gpt2: transformers reads it, slimllm has no adapter; rwkv7x: transformers cannot either."""
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch)
    with pytest.raises(UnsupportedArchitectureError, match=f"'{arch}'.*gemma, gemma2, gemma3_text, granite, llama, mistral, olmo2, phi3, qwen2, qwen3"):
        checkpoint.load_model(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load_model(path)
    path.write_bytes(b"GGUF" + os.urandom(2048))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load_model(path)


@pytest.mark.slow
def test_smollm2_gguf_loads_and_round_trips(smollm2_gguf, tmp_path):
    model, tokenizer = checkpoint.load_model(smollm2_gguf)
    adapter = get_adapter(model)
    assert adapter.name == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert len(adapter.layers(model)) == 30
    for shape in adapter.layer_shapes(model):
        assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size) == (9, 3, 64, 1536)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3

    # uniform prune of the real model (6 of 9 heads, 1024 channels, recovery biases): the stock
    # Llama config reloads it with exactly the same logits at real sizes
    model = _prune(model, uniform=True, heads_per_group=2)
    for layer in adapter.layers(model):
        keep_channels(adapter, layer, list(range(512)))
    expected = _logits(model, ids)
    out = checkpoint.save_pruned(model, tokenizer, tmp_path / "smol", {"source": str(smollm2_gguf)})
    config = _config(out)
    assert config["model_type"] == "llama" and config["num_attention_heads"] == 6
    assert config["head_dim"] == 64 and config["intermediate_size"] == 512
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(reloaded, ids), expected)


def test_uniform_qwen3_with_attention_recovery_only_is_stock(make_tiny_model, tiny_tokenizer, tmp_path):
    """Qwen3's attention_bias covers q/k/v/o: an o_proj recovery bias alone fits the stock config."""
    model = make_tiny_model("qwen3", num_heads=4, num_kv_heads=2)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        keep_heads(adapter, layer, [1, 2])
        set_linear(adapter.attention(layer).o_proj, bias=torch.linspace(-1, 1, 64))
    expected = _logits(model)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    config = _config(out)
    assert config["model_type"] == "qwen3" and config["attention_bias"] is True
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(reloaded), expected)
    _assert_same_weights(model, reloaded)
