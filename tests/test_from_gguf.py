"""A .gguf converted tensor by tensor into the safetensors cache: the same model, file for file,
as transformers' whole-model conversion, with a few tensors in memory instead of all of them."""

import json

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
