"""A .gguf converted tensor by tensor into the safetensors cache: the same model, file for file,
as transformers' whole-model conversion, with a few tensors in memory instead of all of them."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibrate import models
from calibrate.from_gguf import dequantized


def tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_dequantising_slices_of_rows_gives_the_whole_tensor():
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize, quantize

    values = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    for kind in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16):
        data = quantize(values, kind)

        class Tensor:
            tensor_type, n_elements = kind, values.size

        Tensor.data = data
        whole = dequantize(data, kind)
        assert np.array_equal(dequantized(Tensor, chunk=640), whole)  # 10 rows at a time
        assert not np.array_equal(whole, dequantize(quantize(values + 1e-2, kind), kind))


@pytest.mark.slow
def test_streamed_conversion_equals_transformers_whole_model_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "cache"))
    path = models.alias_path("smollm2-135m")
    streamed = models.convert_gguf(path)
    assert json.loads((streamed / "source.json").read_text())["converted"] == "tensor by tensor"
    whole = tmp_path / "whole"
    whole.mkdir()
    models.convert_whole(path, whole)
    new, old = tensors(streamed), tensors(whole)
    assert new.keys() == old.keys() and len(new) == 272  # lm_head is tied to the embeddings
    for name in old:
        assert new[name].dtype == old[name].dtype == torch.float32 and torch.equal(new[name], old[name]), name
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed / name).read_text() == (whole / name).read_text(), name
    assert models.convert_gguf(path) == streamed  # cached: the same key


@pytest.fixture
def tiny_gguf(tmp_path):
    """A tiny llama exported to an f32 .gguf (with its tokenizer) and the model itself."""
    from tiny import tiny_model, tiny_tokenizer

    from pruning.export_gguf import export_gguf

    model = tiny_model("llama")
    return export_gguf(model, tiny_tokenizer(), tmp_path / "tiny.gguf", outtype="f32"), model


def test_a_gguf_that_cannot_be_streamed_is_converted_whole_to_the_same_model(tiny_gguf, tmp_path, monkeypatch):
    from calibrate import from_gguf

    path, model = tiny_gguf
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "streamed"))
    streamed = models.convert_gguf(path)
    assert json.loads((streamed / "source.json").read_text())["converted"] == "tensor by tensor"

    def not_streamable(self, path):
        raise from_gguf.NotStreamable("llama")

    monkeypatch.setattr(from_gguf.GgufTensors, "__init__", not_streamable)
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "whole"))
    whole = models.convert_gguf(path)
    assert whole != streamed and "converted" not in json.loads((whole / "source.json").read_text())
    new, old = tensors(streamed), tensors(whole)
    assert new.keys() == old.keys() and len(new) == len(model.state_dict()) - model.config.tie_word_embeddings
    for name in old:
        assert new[name].dtype == old[name].dtype == torch.float32 and torch.equal(new[name], old[name]), name
        assert torch.equal(new[name], model.state_dict()[name]), name  # f32 export: the model's own weights
    for name in ("config.json", "tokenizer.json"):
        assert (streamed / name).read_text() == (whole / name).read_text(), name


def test_the_cache_key_changes_with_the_converters_version(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(10))
    first = models.gguf_key(path)
    assert models.gguf_key(path) == first
    real = models.metadata.version
    for package in models.CONVERTERS:
        with monkeypatch.context() as m:
            m.setattr(models.metadata, "version", lambda name, p=package: "0.0.0-other" if name == p else real(name))
            assert models.gguf_key(path) != first, package
    monkeypatch.setattr(models, "CONVERSION_FORMAT", models.CONVERSION_FORMAT + 1)
    assert models.gguf_key(path) != first


def test_a_conversion_by_an_older_converter_is_not_reused(tiny_gguf, tmp_path, monkeypatch):
    from calibrate import from_gguf

    path, _ = tiny_gguf
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "cache"))
    real = models.metadata.version
    with monkeypatch.context() as m:
        m.setattr(models.metadata, "version", lambda name: "4.0.0" if name == "transformers" else real(name))
        stale = models.convert_gguf(path)
    (stale / "stale").write_text("made by the older transformers")
    runs, convert = [], from_gguf.convert_streamed
    monkeypatch.setattr(from_gguf, "convert_streamed", lambda *a: runs.append(a) or convert(*a))
    fresh = models.convert_gguf(path)
    assert fresh != stale and len(runs) == 1 and not (fresh / "stale").exists()
    assert models.convert_gguf(path) == fresh and len(runs) == 1  # the current converter's entry is reused


def test_the_conversion_drops_what_it_read_and_wrote_from_the_page_cache(tiny_gguf, tmp_path, monkeypatch):
    """Cached pages stay charged to a memory cgroup: the converted files and the .gguf are flushed and
    dropped once converted, with the cache's files complete on disk."""
    path, _ = tiny_gguf
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "cache"))
    advised, real = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: advised.append((os.readlink(f"/proc/self/fd/{fd}"), a))
                        or real(fd, *a))
    target = models.convert_gguf(path)
    dropped = {Path(name) for name, advice in advised if advice == (0, 0, os.POSIX_FADV_DONTNEED)}
    assert Path(path).resolve() in dropped
    assert {p.resolve() for p in target.rglob("*") if p.is_file()} <= dropped
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))


def test_a_large_vocabulary_s_tables_are_written_in_row_blocks_never_whole(tmp_path, monkeypatch):
    """The embedding and output tables (vocabulary 8192 here, as 150k-token ones in real models) are larger
    than one slice of rows: they go into shards slice by slice, never dequantised whole, and the files
    hold what transformers' whole-model conversion builds."""
    from tiny import tiny_model, tiny_tokenizer

    from calibrate import from_gguf
    from pruning.export_gguf import export_gguf

    model = tiny_model("llama", vocab_size=8192, hidden_size=64, tie_word_embeddings=False)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", outtype="q8_0")
    chunk = 1 << 16  # the tables are 8 slices of rows
    monkeypatch.setattr(from_gguf, "CHUNK_ELEMENTS", chunk)
    whole, blocks = [], []
    dequantized, row_blocks = from_gguf.dequantized, from_gguf.row_blocks
    monkeypatch.setattr(from_gguf, "dequantized", lambda t, c=chunk: whole.append(t.name) or dequantized(t, c))
    monkeypatch.setattr(from_gguf, "row_blocks", lambda t, c=chunk: (blocks.append(t.name), row_blocks(t, c))[1])
    monkeypatch.setattr(from_gguf.GgufTensors, "__iter__", lambda self: from_gguf.GgufTensors.tensors(self, chunk))
    monkeypatch.setenv("GLU_PRUNE_CACHE", str(tmp_path / "cache"))
    streamed = models.convert_gguf(path)
    assert {"token_embd.weight", "output.weight"} <= set(blocks)
    assert "token_embd.weight" not in whole and "output.weight" not in whole
    assert "blk.0.attn_q.weight" in whole  # small tensors, and those the processor permutes, are read whole
    converted = tmp_path / "whole"
    converted.mkdir()
    models.convert_whole(path, converted)
    new, old = tensors(streamed), tensors(converted)
    assert new.keys() == old.keys()
    for name in old:
        assert new[name].dtype == old[name].dtype == torch.float32 and torch.equal(new[name], old[name]), name
