import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate.errors import GluPruneError
from calibrate.stats import LayerStats
from pruning.registry import METHODS, score_neurons

# Three neurons, hidden size 2. gate/up rows are neurons; down columns are neurons.
GATE = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]])
UP = torch.tensor([[0.0, 1.0], [-1.0, 2.0], [1.0, 1.0]])
DOWN = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.0]])
# Activations of 4 tokens for the 3 neurons.
X = torch.tensor([[1.0, 0.0, -2.0], [1.0, 0.0, 2.0], [-1.0, 1.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0))


STATS = stats_of(X)
HAND = {
    "maw": [2 + 1, 0.5 + 2, 3 + 1],
    "ppm": [(1 + 2) + (1 + 0), (0.5 + 0.5) + (2 + 1), (1 + 3) + (1 + 1)],
    "l1": [3 + 1 + 2, 1 + 3 + 3, 4 + 2 + 2],
    "l2": [(5 + 1 + 2) ** 0.5, (0.5 + 5 + 9) ** 0.5, (10 + 2 + 4) ** 0.5],
    "vow": [4.5 + 0.5, 0.0 + 4.5, 8.0 + 0.0],
    "activation": [3 ** 0.5, 0.5, 2 ** 0.5],
    "wanda": [12 ** 0.5 * 2 ** 0.5, 1.0 * 3.0, 8 ** 0.5 * 2.0],
    "flap": [(3.0 - 1.0) * 2, (0.25 - 0.0625) * 9, (2.0 - 0.0) * 4],
}
# hybrid: ppm ranges gate [3, 1, 4], up [1, 3, 2], down columns [2, 3, 2], each divided by its max.
HAND["hybrid"] = [(3 / 4 + 1 / 3 + 2 / 3) * 12 ** 0.5, (1 / 4 + 1 + 1) * 1.0, (1 + 2 / 3 + 2 / 3) * 8 ** 0.5]


@pytest.mark.parametrize("method", sorted(HAND))
def test_score_against_hand_computed_example(method):
    got = score_neurons(method, GATE, UP, DOWN, stats=STATS)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(HAND[method], dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_random_is_seeded_per_layer():
    a = score_neurons("random", GATE, UP, DOWN, seed=1, layer=0)
    assert torch.equal(a, score_neurons("random", GATE, UP, DOWN, seed=1, layer=0))
    assert not torch.equal(a, score_neurons("random", GATE, UP, DOWN, seed=1, layer=1))
    assert not torch.equal(a, score_neurons("random", GATE, UP, DOWN, seed=2, layer=0))


def test_method_table():
    assert {name for name, m in METHODS.items() if m.data} == {"activation", "wanda", "flap", "hybrid", "obs"}
    assert {name for name, m in METHODS.items() if m.second_moment} == {"obs"}
    with pytest.raises(GluPruneError, match="needs calibration statistics"):
        score_neurons("wanda", GATE, UP, DOWN)
    with pytest.raises(GluPruneError, match="choose one of"):
        score_neurons("magic", GATE, UP, DOWN)
    with pytest.raises(GluPruneError, match="recalibrate"):
        score_neurons("wanda", GATE, UP, DOWN, stats=stats_of(X[:, :2]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), neurons=st.integers(2, 12), method=st.sampled_from(sorted(HAND)))
def test_scores_are_permutation_equivariant(seed, neurons, method):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(neurons, 5, generator=g), torch.randn(neurons, 5, generator=g)
    down, x = torch.randn(5, neurons, generator=g), torch.randn(7, neurons, generator=g, dtype=torch.float64)
    perm = torch.randperm(neurons, generator=g)
    base = score_neurons(method, gate, up, down, stats=stats_of(x))
    permuted = score_neurons(method, gate[perm], up[perm], down[:, perm], stats=stats_of(x[:, perm]))
    torch.testing.assert_close(permuted, base[perm])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), neurons=st.integers(2, 40))
def test_obs_is_permutation_equivariant_and_needs_the_second_moment(seed, neurons):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(neurons, 5, generator=g), torch.randn(neurons, 5, generator=g)
    down, x = torch.randn(5, neurons, generator=g), torch.randn(50, neurons, generator=g, dtype=torch.float64)
    perm = torch.randperm(neurons, generator=g)

    def with_second(x):
        s = stats_of(x)
        s.second_moment = x.T @ x
        return s

    base = score_neurons("obs", gate, up, down, stats=with_second(x))
    permuted = score_neurons("obs", gate[perm], up[perm], down[:, perm], stats=with_second(x[:, perm]))
    torch.testing.assert_close(permuted, base[perm])
    with pytest.raises(GluPruneError, match="second-moment"):
        score_neurons("obs", gate, up, down, stats=stats_of(x))
