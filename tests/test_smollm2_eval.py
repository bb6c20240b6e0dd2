"""Integration: the real SmolLM2-135M against the reference figures of tests/reference.json."""

import json
from pathlib import Path

import pytest
import torch
from tiny import reference

from calibrate.corpora import load_corpus
from calibrate.models import alias_path, model_source
from calibrate.perplexity import perplexity
from glu_prune_cli.main import main

pytestmark = pytest.mark.slow

REFERENCE = reference()["base"]


def test_gguf_cache_round_trip_gives_identical_logits(smollm2):
    from transformers import AutoModelForCausalLM

    cached, _ = smollm2
    path = alias_path("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(direct(x).logits, cached(x).logits)
    cache = Path(model_source("smollm2-135m"))
    weights = [cache / "model.safetensors", cache / "model.safetensors.index.json"]
    assert any(w.is_file() for w in weights) and (cache / "config.json").is_file()
    assert json.loads((cache / "source.json").read_text())["gguf"] == str(path.resolve())


def test_wikitext2_reference_perplexity(smollm2, data_dir):
    model, tok = smollm2
    corpus = load_corpus("wikitext2", part="evaluation", data_dir=data_dir)
    result = perplexity(model, tok, corpus, seq_len=512, max_tokens=8192, batch_size=4)
    assert result.perplexity == pytest.approx(REFERENCE["wikitext2"], rel=0.01)


def test_sms_reference_perplexity(smollm2, data_dir):
    model, tok = smollm2
    corpus = load_corpus("sms_spam", part="evaluation", data_dir=data_dir)
    result = perplexity(model, tok, corpus, max_docs=400, batch_size=8)
    assert result.perplexity == pytest.approx(REFERENCE["sms_spam"], rel=0.01)


@pytest.mark.parametrize("name,limits", [("wikitext2", {"max_tokens": 2048}), ("sms_spam", {"max_docs": 40})])
def test_batch_size_does_not_change_perplexity(smollm2, data_dir, name, limits):
    model, tok = smollm2
    corpus = load_corpus(name, part="evaluation", data_dir=data_dir)
    one = perplexity(model, tok, corpus, seq_len=512, batch_size=1, **limits)
    four = perplexity(model, tok, corpus, seq_len=512, batch_size=4, **limits)
    assert one.tokens == four.tokens
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-4)


def test_cli_eval_json(smollm2, capsys, data_dir):
    code = main(["eval", "--corpus", "wikitext2", "--seq-len", "256", "--max-tokens", "1024", "--device", "cpu",
                 "--dtype", "float32", "--data-dir", str(data_dir), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "tokens", "seconds", "tokens_per_second", "model", "corpus"} <= out.keys()
    assert out["tokens"] == 1024 - 4 and out["corpus"] == "wikitext2"
    # the expected figure: the library's perplexity of the same model (the smollm2 fixture: the same
    # cache, float32, CPU) on the same settings (eval's default batch size is 1); the same arithmetic
    model, tok = smollm2
    corpus = load_corpus("wikitext2", part="evaluation", data_dir=data_dir)
    direct = perplexity(model, tok, corpus, seq_len=256, max_tokens=1024, batch_size=1)
    assert out["tokens"] == direct.tokens and out["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)


@pytest.mark.parametrize("name,part", [("wikitext2", "calibration"), ("wikitext2", "evaluation"),
                                       ("sms_spam", "calibration")])
def test_prefix_tokenisation_equals_the_whole_text(smollm2, data_dir, name, part):
    from calibrate.batches import SEPARATORS, message_texts, tokenize_long, tokenize_prefix

    _, tokenizer = smollm2
    corpus = load_corpus(name, part=part, data_dir=data_dir)
    text = SEPARATORS[corpus.kind].join(message_texts(corpus))
    whole = tokenize_long(tokenizer, text)
    for budget in (100, 8192, 65536):
        assert tokenize_prefix(tokenizer, text, budget) == whole[:budget]
