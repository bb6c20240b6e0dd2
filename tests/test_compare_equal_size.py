"""compare --param-ratios: every method removes one fraction of the total parameters (pruning/equal_size.py)."""

import json

import pytest
from tiny import GRID_OPTIONS as OPTIONS
from tiny import grid_workspace

from benchmarks.grid import compare as compare_module
from benchmarks.grid.compare import compare
from benchmarks.grid.spec import equal_size_models, grid_models
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.run import calibrate
from pruning.config import PruneConfig
from pruning.depth import DepthConfig, prune_depth
from pruning.equal_size import plan, size_profile
from pruning.prune import prune

METHODS = ["depth-cosine", "hybrid", "both-hybrid"]
KINDS = {"depth-cosine": "depth", "hybrid": "width", "both-hybrid": "both"}


@pytest.fixture
def setup(tmp_path):
    """An 8-layer tiny llama (0.2 of its parameters is 2 layers: 'both' removes 1) and two corpora."""
    return grid_workspace(tmp_path, num_hidden_layers=8)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluated(model, tokenizer, corpus) -> float:
    part = load_corpus(corpus.source, part="evaluation", name=corpus.name)
    return protocol_perplexity(model, tokenizer, part, OPTIONS["eval_tokens"], OPTIONS["eval_docs"],
                               OPTIONS["seq_len"]).perplexity


def test_rows_have_the_planned_parameter_counts(setup, tmp_path):
    model, corpora = setup
    out = tmp_path / "eq"
    rows = compare(model, corpora[:1], None, METHODS, out, param_ratios=[0.2], **OPTIONS)
    base, tokenizer = load_model(model, dtype="float32")
    profile = size_profile(base)
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"base", "depth-cosine-p0.2-law", "hybrid-p0.2-law", "both-hybrid-p0.2-law"}
    rounding = profile.layer_params / 2 + profile.layers * profile.neuron_params / 2
    for method, kind in KINDS.items():
        row, p = by_model[f"{method}-p0.2-law"], plan(profile, 0.2, kind)
        assert row["parameters"] == p.parameters == row["predicted_parameters"]
        assert abs(row["parameters"] - 0.8 * profile.total) <= rounding
        assert row["param_ratio"] == 0.2 and row["ratio"] is None
        assert row["remove_layers"] == p.remove_layers == len(row["removed_layers"].split(",") if
                                                              row["removed_layers"] else [])
        assert row["intermediate_size"] == (p.intermediate_size or profile.intermediate)
    assert by_model["depth-cosine-p0.2-law"]["remove_layers"] == 2
    assert by_model["both-hybrid-p0.2-law"]["remove_layers"] == 1
    assert by_model["hybrid-p0.2-law"]["intermediate_size"] < profile.intermediate
    # the depth and width cells are the library's own prunes of the base on the corpus
    part = load_corpus(corpora[0].source, part="calibration", name="law")
    batches = list(make_batches(tokenizer, part, seq_len=OPTIONS["calib_seq_len"], max_tokens=OPTIONS["calib_tokens"],
                                batch_size=8, packing=True))
    stats = calibrate(base, batches, layer_importance=True)
    depth = prune_depth(base, DepthConfig(2, "cosine"), stats.depth)
    assert by_model["depth-cosine-p0.2-law"]["removed_layers"] == \
        ",".join(map(str, depth.manifest.removed_layers))
    assert by_model["depth-cosine-p0.2-law"]["perplexity"] == evaluated(depth.model, tokenizer, corpora[0])
    width = prune(base, stats, PruneConfig(intermediate_size=plan(profile, 0.2, "width").intermediate_size,
                                           method="hybrid")).model
    assert by_model["hybrid-p0.2-law"]["perplexity"] == evaluated(width, tokenizer, corpora[0])
    table = (out / "results.md").read_text()
    assert "### 20% of all parameters removed" in table and "| depth-cosine (law) | 2 (" in table
    assert "param_ratio" in (out / "results.csv").read_text().splitlines()[0]
    assert (out / "equal_size.png").is_file()
    assert (out / "stats" / "law-512tokens-seq32-layer-importance.safetensors").is_file()


def test_resume_skips_finished_cells_and_old_folders_keep_resuming(setup, tmp_path, monkeypatch):
    model, corpora = setup
    out = tmp_path / "run"
    old = compare(model, corpora[:1], [0.25], ["hybrid"], out, **OPTIONS)  # a grid folder of neuron ratios
    assert (out / "stats" / "law-512tokens-seq32.safetensors").is_file()
    calls, calibrations = [], []
    real_evaluate, real_calibrate = compare_module.Grid.evaluate, compare_module.calibrate_corpus

    def evaluate(self, m, corpus):
        calls.append(corpus)
        if len(calls) == 2 and not getattr(evaluate, "interrupted", False):
            evaluate.interrupted = True
            raise KeyboardInterrupt
        return real_evaluate(self, m, corpus)

    def calibrating(*args, **kwargs):
        calibrations.append(kwargs["layer_importance"])
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(compare_module.Grid, "evaluate", evaluate)
    monkeypatch.setattr(compare_module, "calibrate_corpus", calibrating)
    with pytest.raises(KeyboardInterrupt):
        compare(model, corpora[:1], None, METHODS, out, param_ratios=[0.2], **OPTIONS)
    assert calibrations == [True]  # the layer importance is a new statistics file, not the old one
    assert len(json.loads((out / "results.json").read_text())) == 3  # base, hybrid-0.25 and one new cell
    calls.clear()
    rows = compare(model, corpora[:1], None, METHODS, out, param_ratios=[0.2], **OPTIONS)
    assert len(calls) == 2 and calibrations == [True]  # the two unfinished cells, on the kept statistics
    assert {r["model"] for r in rows} == {"base", "hybrid-0.25-law", "depth-cosine-p0.2-law", "hybrid-p0.2-law",
                                          "both-hybrid-p0.2-law"}
    calls.clear()
    again = compare(model, corpora[:1], [0.25], ["hybrid"], out, **OPTIONS)  # the old grid: nothing to do
    assert calls == [] and calibrations == [True] and len(again) == 5
    assert [r for r in again if r["model"] == "hybrid-0.25-law"] == [r for r in old if r["model"] == "hybrid-0.25-law"]


def test_equal_size_cells_and_refusals():
    specs = equal_size_models(["depth-skip-loss", "ppm", "both-hybrid"], [0.1, 0.2], ["a", "b"],
                              reconstruct=["none", "lstsq"])
    assert [s.key for s in specs][:8] == [
        "base", "depth-skip-loss-p0.1-a", "depth-skip-loss-p0.1-b", "ppm-p0.1-static", "ppm-p0.1-a-lstsq",
        "ppm-p0.1-b-lstsq", "both-hybrid-p0.1-a", "both-hybrid-p0.1-b"]
    assert len(specs) == 1 + 2 * 9
    with pytest.raises(GluPruneError, match="unknown depth method 'depth-random'"):
        equal_size_models(["depth-random"], [0.2], ["a"])
    with pytest.raises(GluPruneError, match="'nope' is not a width method"):
        equal_size_models(["both-nope"], [0.2], ["a"])
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(GluPruneError, match="must be between 0 and 1"):
            equal_size_models(["hybrid"], [bad], ["a"])
    with pytest.raises(GluPruneError, match="removes layers: give --param-ratios"):
        grid_models(["depth-cosine"], [0.2], ["a"])


def test_compare_refusals_write_nothing(setup, tmp_path):
    model, corpora = setup
    out = tmp_path / "no"
    cases = [(dict(ratios=[0.2], param_ratios=[0.2]), "exclusive"),
             (dict(ratios=None, param_ratios=[0.95], methods=["depth-cosine"]), "takes 8 of the model's 8 layers"),
             (dict(ratios=None, param_ratios=[0.2], schedules=["sequential"]), "uniformly, one-shot")]
    for change, message in cases:
        arguments = {**dict(model=model, corpora=corpora[:1], methods=METHODS, out_dir=out), **OPTIONS, **change}
        with pytest.raises(GluPruneError, match=message):
            compare(**arguments)
    assert not out.exists()


def test_skip_loss_on_one_calibration_batch_names_the_grid_flag(setup, tmp_path):
    model, corpora = setup
    with pytest.raises(GluPruneError, match="law gave 1; raise --calib-tokens to at least 512"):
        compare(model, corpora[:1], None, ["depth-skip-loss"], tmp_path / "one", param_ratios=[0.2],
                **{**OPTIONS, "calib_tokens": 256})
