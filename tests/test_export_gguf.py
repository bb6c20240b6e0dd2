"""GGUF export checked in a real llama.cpp (llama-cpp-python): every family's logits equal
transformers' on the same token ids, pruned models too (per-layer widths as llama.cpp's deci),
quantized files stay close, and bad requests are refused before anything is written.

Tolerances. f32 files with llama.cpp's KV cache in f32 differ from transformers only by summation
order: |logit difference| <= 1e-4 (measured <= 1.3e-5 with logits of std ~1.1). Gemma families:
<= 1e-2, because llama.cpp's CPU GELU reads a float16 table (measured <= 2.1e-3; against transformers
with the GELU input and output rounded to float16 the gap falls to ~1e-5). A wrong convention
(rope row order, norm shift, query scale, multipliers) moves logits by ~1 on these models: they are
initialised with std 0.2 so that attention is far from uniform. Quantized files (llama.cpp's default
f16 KV cache), as ||difference|| / ||logits - mean||: f16 <= 1% (measured <= 0.3%), bf16 <= 5%
(<= 2.1%), q8_0 <= 15% (<= 7%; llama.cpp also quantizes the activations to 8 bits).
"""

import logging

import gguf
import numpy as np
import pytest
import torch
from tiny import FAMILIES, tiny_model, tiny_tokenizer

from benchmarks.deploy.llamacpp import llama_cpp_available, llama_cpp_logits
from calibrate.errors import ConfigError, GluPruneError
from calibrate.glu import glu_layers
from pruning import PruneConfig, prune
from pruning.export_gguf import export_gguf
from pruning.surgery import apply_plan

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama-cpp-python is not installed: pip install 'glu-prune[deploy]'")
IDS = torch.randint(3, 120, (48,), generator=torch.Generator().manual_seed(1)).tolist()
GELU = {"gemma", "gemma2", "gemma3_text"}
# settings that make each family's own conventions matter (the tiny defaults leave them at 1 or off)
FEATURES = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.3),
}


def model_of(family, **overrides):
    return tiny_model(family, initializer_range=0.2, **{**FEATURES.get(family, {}), **overrides})


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def relative_error(got, ref) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref - ref.mean()))


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith("tokenizer.ggml.")}


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture
def notes():
    """The glu_prune notes logged during a test (the CLI's handler setup stops them reaching caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("glu_prune")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_transformers_logits_in_llama_cpp(family, tmp_path):
    model = model_of(family)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", outtype="f32")
    got, ref = llama_cpp_logits(path, IDS), hf_logits(model)
    assert ref.std() > 0.5
    assert np.abs(got - ref).max() <= (1e-2 if family in GELU else 1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("variant", ["llama-biases", "qwen2-tied", "olmo2-tied", "gemma2-no-softcap"])
def test_optional_parts_biases_and_tied_outputs(variant, tmp_path):
    family, overrides = {
        "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
        "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
        "olmo2-tied": ("olmo2", dict(tie_word_embeddings=True)),  # llama.cpp's olmo2 needs an output tensor
        "gemma2-no-softcap": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None)),
    }[variant]
    model = model_of(family, **overrides)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", outtype="f32")
    assert np.abs(llama_cpp_logits(path, IDS) - hf_logits(model)).max() <= (1e-2 if family in GELU else 1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text", "qwen3"])
def test_uniformly_pruned_models(family, tmp_path):
    model = model_of(family)
    pruned = prune(model, None, PruneConfig(ratio=0.3, method="ppm")).model
    path = export_gguf(pruned, tiny_tokenizer(), tmp_path / "p.gguf", outtype="f32")
    assert fields(path)[f"{fields(path)['general.architecture']}.feed_forward_length"] == 45
    assert np.abs(llama_cpp_logits(path, IDS) - hf_logits(pruned)).max() <= (1e-2 if family in GELU else 1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("how", ["global-allocation", "by-hand"])
def test_non_uniform_llama_and_mistral_export_as_deci(how, tmp_path):
    if how == "global-allocation":
        model = model_of("llama")
        pruned = prune(model, None, PruneConfig(ratio=0.4, method="ppm", allocation="global")).model
    else:
        pruned = model_of("mistral")
        apply_plan(pruned, {0: torch.arange(0, 64, 2), 2: torch.arange(10)})
    sizes = [layer.intermediate_size for layer in glu_layers(pruned)]
    assert len(set(sizes)) > 1
    path = export_gguf(pruned, tiny_tokenizer(), tmp_path / "p.gguf", outtype="f32")
    meta = fields(path)
    assert meta["general.architecture"] == "deci" and meta["deci.feed_forward_length"] == sizes
    assert np.abs(llama_cpp_logits(path, IDS) - hf_logits(pruned)).max() <= 1e-4


def test_non_uniform_widths_refused_where_llama_cpp_uses_one_width(tmp_path):
    pruned = model_of("qwen2")
    apply_plan(pruned, {1: torch.arange(20)})
    with pytest.raises(GluPruneError, match="one width.*--allocation uniform"):
        export_gguf(pruned, tiny_tokenizer(), tmp_path / "p.gguf")
    assert list(tmp_path.iterdir()) == []


@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_f16_bf16_and_q8_0_files_load_and_stay_close(family, tmp_path):
    model = model_of(family)
    ref = hf_logits(model)
    for outtype, bound in (("f16", 0.01), ("bf16", 0.05), ("q8_0", 0.15)):
        path = export_gguf(model, tiny_tokenizer(), tmp_path / f"{outtype}.gguf", outtype=outtype)
        types = tensor_types(path)
        assert types["blk.0.ffn_down.weight"] == outtype.upper() and types["output_norm.weight"] == "F32"
        assert relative_error(llama_cpp_logits(path, IDS, f32_cache=False), ref) <= bound, outtype


@needs_llama_cpp
def test_q8_0_rows_that_32_does_not_divide_fall_back_to_f16_with_a_note(tmp_path, notes):
    pruned = prune(model_of("llama"), None, PruneConfig(ratio=0.3, method="ppm")).model  # 45 neurons a layer
    path = export_gguf(pruned, tiny_tokenizer(), tmp_path / "q.gguf", outtype="q8_0")
    assert any("layer widths 45 are not multiples of 32" in n and "--multiple-of 32" in n for n in notes)
    types = tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_gate.weight"] == "Q8_0"
    assert relative_error(llama_cpp_logits(path, IDS, f32_cache=False), hf_logits(pruned)) <= 0.15


def test_k_quants_are_refused_with_the_llama_quantize_command_and_a_width_note(tmp_path, notes):
    pruned = prune(model_of("llama"), None, PruneConfig(ratio=0.3, method="ppm")).model
    with pytest.raises(ConfigError) as info:
        export_gguf(pruned, tiny_tokenizer(), tmp_path / "m.gguf", outtype="q4_k_m")
    message = str(info.value)
    assert f"llama-quantize {tmp_path / 'm-f16.gguf'} {tmp_path / 'm.gguf'} Q4_K_M" in message and "\n" not in message
    assert any("layer widths 45 are not multiples of 256" in n and "--multiple-of 256" in n for n in notes)
    notes.clear()
    with pytest.raises(ConfigError):
        export_gguf(tiny_model("llama", intermediate_size=512), tiny_tokenizer(), tmp_path / "m.gguf", "q4_k")
    assert notes == []  # 512 is a whole number of k-quant blocks
    with pytest.raises(ConfigError, match="choose one of f32, f16, bf16, q8_0"):
        export_gguf(pruned, tiny_tokenizer(), tmp_path / "m.gguf", outtype="q9")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="already exists"):
        export_gguf(model, tiny_tokenizer(), out)
    assert out.read_text() == "keep me"
    export_gguf(model, tiny_tokenizer(), out, force=True)
    assert fields(out)["general.architecture"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_hugging_face_tokenizer_metadata_of_a_tiny_model(tmp_path):
    path = export_gguf(tiny_model("llama"), tiny_tokenizer(), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    value = {k: f.contents() for k, f in reader.fields.items()}
    assert value["tokenizer.ggml.model"] == "llama" and len(value["tokenizer.ggml.tokens"]) == 128
    assert value["tokenizer.ggml.tokens"][:5] == ["<pad>", "<bos>", "<eos>", "<unk>", "\n"]
    assert value["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL]
    assert (value["tokenizer.ggml.bos_token_id"], value["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert value["tokenizer.ggml.padding_token_id"] == 0


def test_cli_export_of_a_pruned_folder(tmp_path, capsys):
    from tiny import save_tiny

    from glu_prune_cli.main import main
    from pruning.save import save_pruned

    save_tiny(tmp_path / "m")
    pruned = prune(tiny_model("llama"), None, PruneConfig(ratio=0.4, method="ppm", allocation="global")).model
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "p")
    sizes = [layer.intermediate_size for layer in glu_layers(pruned)]
    assert main(["export", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "p.gguf"), "--outtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = fields(tmp_path / "p.gguf")
    assert meta["deci.feed_forward_length"] == sizes and "glu_prune.manifest" in meta
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p.gguf")]) == 2  # exists
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf")]) == 0
    assert fields(tmp_path / "m.gguf")["llama.feed_forward_length"] == 64


# ---- the real SmolLM2-135M ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_pruned(smollm2, data_dir):
    """SmolLM2 pruned by 20% (hybrid scores on 2048 calibration tokens), uniform and global allocation."""
    from calibrate.batches import make_batches
    from calibrate.corpora import load_corpus
    from calibrate.run import calibrate

    model, tok = smollm2
    corpus = load_corpus("wikitext2", part="calibration", data_dir=data_dir)
    stats = calibrate(model, make_batches(tok, corpus, seq_len=256, max_tokens=2048))
    return {allocation: prune(model, stats, PruneConfig(ratio=0.2, method="hybrid", allocation=allocation)).model
            for allocation in ("uniform", "global")}


@pytest.fixture(scope="module")
def wiki_ids(smollm2, data_dir):
    from calibrate.corpora import load_corpus

    text = "\n\n".join(load_corpus("wikitext2", part="evaluation", data_dir=data_dir).texts[:40])
    return smollm2[1](text)["input_ids"][:256]


@pytest.mark.slow
def test_smollm2_tokenizer_comes_from_its_gguf_or_its_hugging_face_tokenizer(smollm2, tmp_path):
    from calibrate.models import alias_path

    model, tok = smollm2
    source = {k: f.contents() for k, f in gguf.GGUFReader(alias_path("smollm2-135m")).fields.items()
              if k.startswith("tokenizer.")}
    copied = export_gguf(model, tok, tmp_path / "copied.gguf", outtype="q8_0")
    assert {k: f.contents() for k, f in gguf.GGUFReader(copied).fields.items() if k.startswith("tokenizer.")} \
        == source
    model.config.name_or_path = "not-a-gguf"  # no source file: the vocabulary is built from the HF tokenizer
    try:
        built = export_gguf(model, tok, tmp_path / "built.gguf", outtype="q8_0")
    finally:
        model.config.name_or_path = "smollm2-135m"
    value = {k: f.contents() for k, f in gguf.GGUFReader(built).fields.items()}
    assert value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"]
    assert value["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
    assert value["tokenizer.ggml.eos_token_id"] == source["tokenizer.ggml.eos_token_id"]
    if not llama_cpp_available():  # a skip, so that CI refuses the shrunk check (tests/skip_policy.py)
        pytest.skip("llama-cpp-python is not installed: the built vocabulary's tokenization in llama.cpp unchecked")
    from benchmarks.deploy.llamacpp import llama_cpp_tokens

    text = "The pruned model keeps the neurons its domain uses, in 2 or 3 layers."
    assert llama_cpp_tokens(built, text) == tok(text)["input_ids"]


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_pruned_smollm2_gives_the_same_logits_in_llama_cpp(smollm2_pruned, wiki_ids, allocation, tmp_path):
    """f32 file, f32 KV cache, 256 wikitext tokens: logits (std ~7) within 5e-3 (measured 2.6e-4 unpruned)."""
    pruned = smollm2_pruned[allocation]
    path = export_gguf(pruned, None, tmp_path / "p.gguf", outtype="f32")
    assert fields(path)["general.architecture"] == ("llama" if allocation == "uniform" else "deci")
    got, ref = llama_cpp_logits(path, wiki_ids), hf_logits(pruned, wiki_ids)
    assert np.abs(got - ref).max() <= 5e-3
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_perplexity_of_pruned_smollm2_matches_ours(smollm2, smollm2_pruned, data_dir, tmp_path):
    """wikitext2 evaluation, windows of 512, first 1024 tokens: f32 and f16 files within 0.5%."""
    from benchmarks.deploy.llamacpp import llama_cpp_perplexity
    from calibrate.corpora import load_corpus
    from calibrate.perplexity import perplexity

    tok = smollm2[1]
    pruned = smollm2_pruned["global"]
    corpus = load_corpus("wikitext2", part="evaluation", data_dir=data_dir)
    ours = perplexity(pruned, tok, corpus, seq_len=512, max_tokens=1024)
    for outtype in ("f32", "f16"):
        path = export_gguf(pruned, tok, tmp_path / f"{outtype}.gguf", outtype=outtype)
        theirs = llama_cpp_perplexity(path, tok, corpus, seq_len=512, max_tokens=1024)
        assert (theirs.tokens, theirs.sequences) == (ours.tokens, ours.sequences)
        assert abs(theirs.perplexity / ours.perplexity - 1) <= 0.005, (outtype, theirs.perplexity, ours.perplexity)


@needs_llama_cpp
def test_a_file_llama_cpp_cannot_load_is_one_error_naming_it(tmp_path):
    from benchmarks.deploy.llamacpp import llama_cpp_logits

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(GluPruneError, match="llama.cpp could not load .*broken.gguf"):
        llama_cpp_logits(broken, IDS)
