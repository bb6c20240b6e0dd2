"""Depth pruning: layer importance recorded by the calibration pass, skip loss, layer removal that
reloads with stock transformers (every family, KV cache included), and depth with width in one run."""

import contextlib
import io
import json

import pytest
import torch
from tiny import FAMILIES, hooks_left, random_batches, saved_manifest, tiny_model, tiny_tokenizer, tiny_workspace
from transformers import AutoModelForCausalLM

from calibrate.errors import ConfigError, GluPruneError
from calibrate.glu import decoder_layers, glu_layers
from calibrate.layer_importance import token_cosines
from calibrate.models import load_pruned
from calibrate.run import calibrate
from calibrate.stats import ActivationStats, summary
from glu_prune_cli.main import main
from pruning.depth import DepthConfig, measure_skip_loss, parse_removal, prune_depth
from pruning.importance import mean_nll
from pruning.save import save_pruned

SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
# five layers, a sliding window shorter than the test inputs, and sliding/full patterns that a
# regenerated default would not give back after removing layers 0 and 2
DEEP = {
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "gemma2": dict(sliding_window=4, layer_types=SLIDING),
    "gemma3_text": dict(sliding_window=4, layer_types=SLIDING),
}


def deep_model(family: str, dtype=torch.float32):
    return tiny_model(family, dtype=dtype, num_hidden_layers=5, **DEEP.get(family, {}))


def ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def greedy(model, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_two_layers_reloads_with_stock_transformers(family, tmp_path):
    model = deep_model(family)  # float32: a float64 reload recomputes rotary buffers in float32
    types = getattr(model.config, "layer_types", None)
    result = prune_depth(model, DepthConfig((0, 2)))
    pruned = result.model
    assert len(decoder_layers(pruned)) == 3 and len(decoder_layers(model)) == 5  # a copy was cut
    assert result.manifest.depth["removed_layers"] == [0, 2]
    assert result.manifest.depth["kept_layers"] == [1, 3, 4]
    for new, layer in enumerate(decoder_layers(pruned)):
        assert layer.self_attn.layer_idx == new
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert again.config.num_hidden_layers == 3
    if types is not None:
        assert again.config.layer_types == [types[i] for i in (1, 3, 4)]
        kept_modules = [decoder_layers(model)[i].self_attn for i in (1, 3, 4)]
        for before, after in zip(kept_modules, decoder_layers(again)):
            assert getattr(after.self_attn, "sliding_window", None) == getattr(before, "sliding_window", None)
    x = ids()
    torch.testing.assert_close(logits(again, x), logits(pruned, x), rtol=0, atol=0)
    assert not torch.allclose(logits(again, x), logits(model, x))
    prompt = ids(1, 8, seed=1)
    cached = greedy(again, prompt, use_cache=True)
    assert cached.shape[1] == prompt.shape[1] + 6
    assert torch.equal(cached, greedy(again, prompt, use_cache=False))
    assert torch.equal(greedy(pruned, prompt, use_cache=True), cached)


def test_removed_layers_equal_identity_layers():
    """The in-memory pruned model computes what the model does with those layers replaced by the identity."""
    from pruning.depth import skipped

    model = deep_model("gemma2", torch.float64)
    pruned = prune_depth(model, DepthConfig((0, 2))).model
    x = ids()
    with skipped(model, 0), skipped(model, 2):
        skipping = logits(model, x)
    torch.testing.assert_close(logits(pruned, x), skipping, rtol=1e-12, atol=1e-12)
    assert hooks_left(model) == 0


def test_layer_cosine_is_that_of_the_hidden_states():
    model = tiny_model("llama", dtype=torch.float64)
    batches, x = random_batches()
    stats = calibrate(model, batches, layer_importance=True)
    assert stats.meta["layer_importance"] == "cosine" and hooks_left(model) == 0
    with torch.no_grad():  # (transformers leaves its own hooks for hidden-state capture)
        hidden = model(x, output_hidden_states=True).hidden_states  # the last one is after the final norm
    for i in range(len(hidden) - 2):
        expected = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert stats.depth.cosine[i].count == x.numel()
        assert stats.depth.cosine[i].mean_cosine == pytest.approx(expected.mean().item(), rel=1e-12)


def test_token_cosines_of_zero_rows():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [-1.0, -1.0]])
    assert token_cosines(x, y).tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0])


def test_layer_importance_does_not_depend_on_batch_size_order_or_padding():
    model = tiny_model("qwen3", dtype=torch.float64)
    _, x = random_batches(16)
    runs = [calibrate(model, [{"input_ids": x[i : i + bs]} for i in range(0, 16, bs)],
                      layer_importance=True) for bs in (1, 4, 8)]
    runs.append(calibrate(model, [{"input_ids": x[i : i + 2]} for i in range(14, -1, -2)],
                          layer_importance=True))
    halves = [calibrate(model, [{"input_ids": x[i : i + 4]} for i in range(a, b, 4)],
                        layer_importance=True) for a, b in ((0, 8), (8, 16))]
    runs.append(halves[0].merge(halves[1]))
    first = runs[0].depth.cosine
    for other in runs[1:]:
        assert other.depth.cosine.keys() == first.keys()
        for i in first:
            assert other.depth.cosine[i].count == first[i].count == 16 * 12
            assert other.depth.cosine[i].cos_sum == pytest.approx(first[i].cos_sum, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (3, 9, 5, 12)]
    one_by_one = calibrate(model, [{"input_ids": r[None]} for r in rows], layer_importance=True)
    padded_ids, mask = torch.zeros(4, 12, dtype=torch.long), torch.zeros(4, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        padded_ids[i, : len(r)], mask[i, : len(r)] = r, 1
    padded = calibrate(model, [{"input_ids": padded_ids, "attention_mask": mask}],
                       layer_importance=True)
    for i in first:
        assert padded.depth.cosine[i].count == 29
        assert padded.depth.cosine[i].cos_sum == pytest.approx(one_by_one.depth.cosine[i].cos_sum, rel=1e-12)


def test_layer_subset_records_those_layers_and_stops_after_the_last():
    model = tiny_model("llama", num_hidden_layers=4)
    ran = []
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    stats = calibrate(model, [{"input_ids": ids()}], layers=[0, 2], layer_importance=True)
    assert sorted(stats.depth.cosine) == [0, 2] and 3 not in ran


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_skip_loss_is_the_loss_of_the_model_without_that_layer(family):
    model = deep_model(family, torch.float64)
    batches, _ = random_batches(8, batch=4)
    stats = calibrate(model, batches, layer_importance=True)
    measure_skip_loss(model, stats.depth, batches)
    base = mean_nll(model, batches)
    assert stats.depth.skip_base == pytest.approx(base, rel=1e-12)
    assert stats.depth.skip_tokens == 8 * 11
    for layer in range(5):
        without = prune_depth(model, DepthConfig((layer,))).model
        assert stats.depth.skip_loss[layer] == pytest.approx(mean_nll(without, batches) - base, rel=1e-9, abs=1e-12)
    assert hooks_left(model) == 0 and len(set(stats.depth.skip_loss.values())) == 5


def test_the_least_important_layers_are_removed():
    model = deep_model("llama")
    batches, _ = random_batches(8, batch=4)
    stats = calibrate(model, batches, layer_importance=True)
    measure_skip_loss(model, stats.depth, batches)
    for score in ("cosine", "skip-loss"):
        values = stats.depth.scores(score)
        expected = sorted(sorted(values, key=values.get)[:2])
        result = prune_depth(model, DepthConfig(2, score), stats.depth, statistics=stats.meta)
        assert result.manifest.depth["removed_layers"] == expected
        assert result.manifest.depth["layer_scores"] == {str(i): v for i, v in values.items()}
        assert result.manifest.depth["statistics"]["model_type"] == "llama"


def test_statistics_file_keeps_layer_importance(tmp_path):
    model = tiny_model("llama")
    batches, _ = random_batches(8, batch=4)
    stats = calibrate(model, batches, layer_importance=True)
    measure_skip_loss(model, stats.depth, batches)
    stats.save(tmp_path / "s.st")
    loaded = ActivationStats.load(tmp_path / "s.st", model=model)
    assert loaded.meta["layer_importance"] == "cosine,skip-loss"
    assert loaded.depth.scores("cosine") == stats.depth.scores("cosine")
    assert loaded.depth.skip_loss == stats.depth.skip_loss and loaded.depth.skip_tokens == stats.depth.skip_tokens
    text = summary(loaded)
    assert "layer importance (cosine,skip-loss" in text and f"{stats.depth.skip_loss[1]:10.4f}" in text
    merged = loaded.merge(loaded)
    assert merged.depth.skip_loss is None and merged.depth.cosine[0].count == 2 * stats.depth.cosine[0].count
    plain = calibrate(model, batches)
    plain.save(tmp_path / "plain.st")
    assert ActivationStats.load(tmp_path / "plain.st").depth is None
    assert "layer_importance" not in loaded.merge(ActivationStats.load(tmp_path / "plain.st")).meta


def test_depth_then_width_on_an_already_pruned_manifest_renumbers_it():
    """Depth on a width-pruned model: the width fields follow the kept layers."""
    from pruning.config import PruneConfig
    from pruning.prune import prune

    model = deep_model("llama")
    batches, _ = random_batches(8, batch=4)
    width = prune(model, calibrate(model, batches),
                  PruneConfig(ratio=0.25, method="wanda", allocation="owl", layers=(1, 2, 3))).model
    sizes = [g.intermediate_size for g in glu_layers(width)]
    kept = width.config.glu_prune["kept_indices"]
    result = prune_depth(width, DepthConfig((0, 2)))
    manifest = result.manifest.to_dict()
    assert manifest["intermediate_sizes"] == [sizes[i] for i in (1, 3, 4)]
    assert manifest["kept_indices"] == {"0": kept["1"], "1": kept["3"]}
    assert manifest["layers"] == [0, 1] and manifest["config"]["layers"] == [0, 1]
    assert manifest["depth"]["kept_layers"] == [1, 3, 4]
    again = prune_depth(result.model, DepthConfig((1,))).manifest.depth
    assert again["kept_layers"] == [1, 4] and again["removed_layers"] == [0, 2, 3]
    assert again["num_layers_before"] == 5


@pytest.mark.parametrize("text,expected", [("2", 2), ("3,7", (3, 7)), ("4-6", (4, 5, 6)), ("5,", (5,)),
                                           (" 1, 3 ", (1, 3))])
def test_parse_removal(text, expected):
    assert parse_removal(text) == expected


@pytest.mark.parametrize("remove,problem", [(0, "at least 1"), ((), "empty"), ((1, 1), "layer 1 twice"),
                                            ((-1,), "negative")])
def test_bad_depth_settings(remove, problem):
    with pytest.raises(ConfigError, match=problem):
        DepthConfig(remove)
    with pytest.raises(ConfigError, match="choose one of"):
        DepthConfig(1, score="angular")


@pytest.mark.parametrize("config,problem", [(DepthConfig(3), "leaves none"), (DepthConfig((0, 1, 2)), "leaves none"),
                                            (DepthConfig((0, 3)), "layer 3 is out of range"),
                                            (DepthConfig(1), "needs layer importance")])
def test_refused_removals_leave_the_model_unchanged(config, problem):
    model = tiny_model("llama")
    x = ids()
    before = logits(model, x)
    with pytest.raises(GluPruneError, match=problem):
        prune_depth(model, config, inplace=True)
    assert len(decoder_layers(model)) == 3 and model.config.num_hidden_layers == 3
    assert torch.equal(logits(model, x), before)


def test_importance_must_cover_every_layer():
    model = tiny_model("llama")
    stats = calibrate(model, [{"input_ids": ids()}], layers=[0, 1], layer_importance=True)
    with pytest.raises(GluPruneError, match="calibrate every layer"):
        prune_depth(model, DepthConfig(1), stats.depth)
    with pytest.raises(GluPruneError, match="no skip loss"):
        prune_depth(model, DepthConfig(1, "skip-loss"), stats.depth)


def cli(*args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in args]) == 0
    return out.getvalue()


def test_cli_calibrate_layer_importance_then_remove_by_it(tmp_path):
    model = tiny_workspace(tmp_path)
    m, c = tmp_path / "m", tmp_path / "c.txt"
    cli("calibrate", "--model", m, "--corpus", c, "--part", "all", "--max-tokens", 512, "--seq-len", 32,
        "--layer-importance", "--out", tmp_path / "s.st")
    stats = ActivationStats.load(tmp_path / "s.st")
    assert stats.meta["layer_importance"] == "cosine,skip-loss" and stats.depth.skip_tokens > 0
    assert "skip-loss" in cli("stats", tmp_path / "s.st")
    for score in ("cosine", "skip-loss"):
        printed = cli("prune", "--model", m, "--stats", tmp_path / "s.st", "--remove-layers", 1, "--layer-score", score,
                      "--out", tmp_path / score)
        values = stats.depth.scores(score)
        weakest = min(values, key=values.get)
        depth = saved_manifest(tmp_path / score)["depth"]
        assert depth["removed_layers"] == [weakest] and f"removed layers {weakest} ({score}" in printed
        assert depth["statistics"]["fingerprint"] == stats.meta["fingerprint"]
        again = AutoModelForCausalLM.from_pretrained(tmp_path / score).eval()
        kept = [i for i in range(3) if i != weakest]
        reference = prune_depth(model, DepthConfig((weakest,))).model
        assert again.config.num_hidden_layers == 2 and depth["kept_layers"] == kept
        torch.testing.assert_close(logits(again, ids()), logits(reference, ids()))
    assert "Depth-pruned" in (tmp_path / "cosine" / "README.md").read_text()


def test_cli_depth_and_width_in_one_command(tmp_path):
    tiny_workspace(tmp_path, num_hidden_layers=4)
    m, c = tmp_path / "m", tmp_path / "c.txt"
    printed = cli("prune", "--model", m, "--corpus", c, "--part", "all", "--max-tokens", 512, "--seq-len", 32,
                  "--remove-layers", 2, "--ratio", 0.25, "--method", "wanda", "--allocation", "owl",
                  "--out", tmp_path / "p")
    manifest = saved_manifest(tmp_path / "p")
    depth = manifest["depth"]
    assert len(depth["removed_layers"]) == 2 and len(depth["kept_layers"]) == 2
    assert depth["statistics"]["num_layers"] == "4"  # importance measured on the unpruned model
    assert manifest["statistics"]["num_layers"] == "2"  # neurons chosen on the remaining model
    assert len(manifest["intermediate_sizes"]) == 2 and manifest["intermediate_sizes_before"] == [64, 64]
    assert sorted(manifest["kept_indices"]) == ["0", "1"] and manifest["method"] == "wanda"
    assert "removed layers" in printed and "wanda" in printed
    loaded = load_pruned(tmp_path / "p")
    assert [g.intermediate_size for g in glu_layers(loaded)] == manifest["intermediate_sizes"]
    assert loaded.config.num_hidden_layers == 2
    card = (tmp_path / "p" / "README.md").read_text()
    assert "Depth- and width-pruned" in card and "method: `wanda`" in card
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.slow
def test_smollm2_remove_two_layers_reloads_and_generates(smollm2, tmp_path):
    """The real SmolLM2-135M: importance on 512 tokens, the two least important layers removed, a
    stock reload computing the in-memory model's logits, and cached greedy generation as uncached."""
    model, tokenizer = smollm2
    x = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    stats = calibrate(model, [{"input_ids": x}], layer_importance=True)
    result = prune_depth(model, DepthConfig(2), stats.depth, statistics=stats.meta)
    assert result.model.config.num_hidden_layers == 28 and model.config.num_hidden_layers == 30
    save_pruned(result.model, tokenizer, tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    torch.testing.assert_close(logits(again, x), logits(result.model, x), rtol=0, atol=0)
    assert torch.equal(greedy(again, x, use_cache=True), greedy(again, x, use_cache=False))
