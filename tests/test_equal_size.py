"""Equal-size plans: the models actually produced have exactly the predicted parameter counts."""

import pytest
from tiny import FAMILIES, tiny_model

from calibrate.errors import GluPruneError
from pruning.config import PruneConfig
from pruning.depth import DepthConfig, prune_depth
from pruning.equal_size import PLANS, plan, size_profile
from pruning.prune import prune


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def apply(model, p):
    """The plan applied: its first layers removed (any layers hold as many), then uniform width by L2."""
    if p.remove_layers:
        model = prune_depth(model, DepthConfig(tuple(range(p.remove_layers)))).model
    if p.intermediate_size is not None:
        model = prune(model, None, PruneConfig(intermediate_size=p.intermediate_size, method="l2")).model
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_produced_counts_equal_predicted(family):
    model = tiny_model(family, num_hidden_layers=8)
    profile = size_profile(model)
    assert profile.total == count(model)
    for ratio in (0.2, 0.4):
        plans = {kind: plan(profile, ratio, kind) for kind in PLANS}
        for p in plans.values():
            assert count(apply(model, p)) == p.parameters, (family, ratio, p)
        # all three remove the same parameters, up to half a neuron in each layer
        depth = plans["depth"].parameters
        assert abs(plans["width"].parameters - depth) <= profile.layers * profile.neuron_params / 2
        assert abs(plans["both"].parameters - depth) <= profile.layers * profile.neuron_params / 2
        assert plans["both"].remove_layers == plans["depth"].remove_layers // 2 >= 1


def test_biases_count_per_neuron():
    model = tiny_model("llama", num_hidden_layers=8, mlp_bias=True)
    profile = size_profile(model)
    assert profile.neuron_params == 3 * model.config.hidden_size + 2  # gate and up biases; down's is not per neuron
    p = plan(profile, 0.2, "width")
    assert count(apply(model, p)) == p.parameters


def test_depth_is_the_nearest_layer_count():
    model = tiny_model("llama", num_hidden_layers=8)
    profile = size_profile(model)
    for ratio in (0.05, 0.1, 0.2, 0.3):
        d = plan(profile, ratio, "depth").remove_layers
        target = ratio * profile.total
        assert all(abs(d * profile.layer_params - target) <= abs(n * profile.layer_params - target)
                   for n in range(1, profile.layers))


def test_refusals():
    profile = size_profile(tiny_model("llama", num_hidden_layers=8))
    with pytest.raises(GluPruneError, match="between 0 and 1"):
        plan(profile, 1.5, "depth")
    with pytest.raises(GluPruneError, match="unknown plan"):
        plan(profile, 0.1, "deep")
    with pytest.raises(GluPruneError, match="smaller --param-ratio"):
        plan(profile, 0.95, "depth")


def test_depth_vs_width_runs_and_resumes(tmp_path):
    import json

    from tiny import tiny_workspace

    from benchmarks.studies.depth_vs_width import main

    tiny_workspace(tmp_path, "llama", num_hidden_layers=8)
    args = ["--model", str(tmp_path / "m"), "--param-ratios", "0.2", "--corpora", f"c={tmp_path / 'c.txt'}",
            "--calib-tokens", "2048", "--eval-tokens", "256", "--seq-len", "32", "--out", str(tmp_path / "out")]
    main(args)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["base", "depth-0.2-c", "width-0.2-c", "both-0.2-c"]
    profile = size_profile(tiny_model("llama", num_hidden_layers=8))
    for row in rows[1:]:
        assert row["parameters"] == plan(profile, 0.2, row["kind"]).parameters
    assert "both-0.2-c" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "depth_vs_width.png").is_file()
    main(args)  # resumed: nothing measured again
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == rows
