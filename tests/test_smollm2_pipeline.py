"""Integration: calibration and pruning of the real SmolLM2-135M (reference settings: tests/reference.json)."""

import pytest
import torch
from tiny import reference

from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.perplexity import perplexity
from calibrate.run import calibrate
from calibrate.stats import merge
from pruning import PruneConfig, load_pruned, prune, save_pruned

pytestmark = pytest.mark.slow

OPTIPFAIR_HYBRID_20_WIKI = reference()["optipfair"]["hybrid-0.2-wikitext2"]["wikitext2"]


def assert_same(a, b, rel=1e-9):
    """Equal to ``rel`` of each statistic's largest magnitude (float64 forwards of different batch
    shapes round differently, around 1e-11 here)."""
    assert a.layers.keys() == b.layers.keys()
    for i in a.layers:
        assert a.layers[i].count == b.layers[i].count
        for f in ("sum", "abs_sum", "sq_sum", "max_abs"):
            x, y = getattr(a.layers[i], f), getattr(b.layers[i], f)
            torch.testing.assert_close(x, y, rtol=rel, atol=rel * float(x.abs().max()))


@pytest.fixture(scope="module")
def smollm2_float64():
    """CPU kernels of float32 forwards may round differently for different batch shapes (1e-4
    relative on some machines), so batch independence is checked in float64."""
    from calibrate.models import load_model

    return load_model("smollm2-135m", dtype="float64", with_tokenizer=False)[0]


@pytest.fixture(scope="module")
def reference_stats(smollm2, data_dir):
    """Statistics of 64 packed sequences of 128 tokens from each corpus's calibration part."""
    model, tok = smollm2
    stats = {}
    for name in ("wikitext2", "sms_spam"):
        corpus = load_corpus(name, part="calibration", data_dir=data_dir)
        stats[name] = calibrate(model, make_batches(tok, corpus, seq_len=128, max_tokens=8192, packing=True))
    return stats


def test_statistics_do_not_depend_on_batch_size_and_are_additive(smollm2, smollm2_float64, data_dir):
    model, tok = smollm2_float64, smollm2[1]
    corpus = load_corpus("wikitext2", part="calibration", data_dir=data_dir)
    one = calibrate(model, make_batches(tok, corpus, seq_len=64, max_tokens=1024, batch_size=1))
    eight = make_batches(tok, corpus, seq_len=64, max_tokens=1024, batch_size=8)
    assert one.tokens == 1024 and sum(b["input_ids"].shape[0] for b in eight) == 16
    assert_same(one, calibrate(model, eight))
    halves = merge(calibrate(model, eight[:1]), calibrate(model, eight[1:]))
    assert_same(one, halves)


def test_padded_message_batches_equal_one_by_one(smollm2, smollm2_float64, data_dir):
    """Padding never enters the statistics."""
    model64, tok = smollm2_float64, smollm2[1]
    corpus = load_corpus("sms_spam", part="calibration", data_dir=data_dir)
    padded = make_batches(tok, corpus, seq_len=128, max_tokens=300, batch_size=8)
    assert any(not b["attention_mask"].all() for b in padded)
    single = make_batches(tok, corpus, seq_len=128, max_tokens=300, batch_size=1)
    assert_same(calibrate(model64, padded), calibrate(model64, single))


def test_hybrid_matches_optipfair_reference_and_the_diagonal_wins(smollm2, data_dir, reference_stats):
    model, tok = smollm2
    wiki = load_corpus("wikitext2", part="evaluation", data_dir=data_dir)
    sms = load_corpus("sms_spam", part="evaluation", data_dir=data_dir)
    ppl = {}
    for calibrated_on, stats in reference_stats.items():
        pruned = prune(model, stats, PruneConfig(ratio=0.2, method="hybrid")).model
        ppl[calibrated_on, "wikitext2"] = perplexity(pruned, tok, wiki, seq_len=512, max_tokens=8192,
                                                     batch_size=4).perplexity
        ppl[calibrated_on, "sms_spam"] = perplexity(pruned, tok, sms, max_docs=200, batch_size=8).perplexity
    assert ppl["wikitext2", "wikitext2"] == pytest.approx(OPTIPFAIR_HYBRID_20_WIKI, rel=0.02)
    assert ppl["wikitext2", "wikitext2"] < ppl["sms_spam", "wikitext2"]
    assert ppl["sms_spam", "sms_spam"] < ppl["wikitext2", "sms_spam"]


def test_pruned_smollm2_reloads_with_identical_logits(smollm2, reference_stats, tmp_path):
    model, tok = smollm2
    pruned = prune(model, reference_stats["sms_spam"], PruneConfig(ratio=0.4, method="wanda")).model
    assert pruned.config.intermediate_size == 922
    save_pruned(pruned, tok, tmp_path / "m")
    reloaded = load_pruned(tmp_path / "m")
    x = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned(x).logits)
