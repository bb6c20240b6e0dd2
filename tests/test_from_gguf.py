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
