import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from calibrate.errors import ConfigError, GluPruneError
from pruning.plan import Target, global_counts, kept_count, plan_global, plan_uniform, top_k


def test_kept_counts_of_the_protocol():
    assert kept_count(1536, 576, Target(ratio=0.2)) == 1229
    assert kept_count(1536, 576, Target(ratio=0.4)) == 922
    assert kept_count(1536, 576, Target(expansion_ratio=2.4)) == 1382
    assert kept_count(1536, 576, Target(intermediate_size=1000)) == 1000


def test_multiple_of_rounds_down():
    assert kept_count(1536, 576, Target(ratio=0.2, multiple_of=64)) == 1216
    assert kept_count(1536, 576, Target(intermediate_size=1536, multiple_of=100)) == 1500


@pytest.mark.parametrize("target,option,flag", [
    (dict(ratio=0.0), "ratio", "--ratio 0.0"), (dict(ratio=1.0), "ratio", "--ratio 1.0"),
    (dict(ratio=-0.5), "ratio", "--ratio -0.5"), (dict(expansion_ratio=0.0), "expansion_ratio", "--expansion-ratio"),
    (dict(intermediate_size=0), "intermediate_size", "--intermediate-size 0"),
    (dict(ratio=0.2, multiple_of=0), "multiple_of", "--multiple-of 0"),
    (dict(ratio=0.2, multiple_of=-3), "multiple_of", "--multiple-of -3"),
    (dict(), "target", "exactly one"), (dict(ratio=0.2, intermediate_size=5), "target", "exactly one")])
def test_invalid_targets_name_the_option_in_library_terms(target, option, flag):
    with pytest.raises(ConfigError, match=f"^{option}=") as caught:
        Target(**target)
    assert caught.value.option == option and flag in caught.value.as_flag()


def test_targets_that_grow_or_keep_nothing():
    with pytest.raises(GluPruneError, match="larger than the model's 1536"):
        kept_count(1536, 576, Target(intermediate_size=2000))
    with pytest.raises(GluPruneError, match="more than the model's"):
        kept_count(1536, 576, Target(expansion_ratio=3.0))
    with pytest.raises(GluPruneError, match="keeps no neuron"):
        kept_count(10, 4, Target(ratio=0.99))
    with pytest.raises(GluPruneError, match="keeps no neuron"):
        kept_count(100, 4, Target(ratio=0.5, multiple_of=64))


def test_top_k_keeps_highest_in_original_order_with_stable_ties():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1])
    assert top_k(scores, 3).tolist() == [1, 2, 3]
    assert top_k(torch.ones(4), 2).tolist() == [0, 1]


def test_uniform_plan():
    scores = {0: torch.tensor([1.0, 5.0, 3.0]), 3: torch.tensor([9.0, 0.0, 4.0])}
    plan = plan_uniform(scores, 2)
    assert plan[0].tolist() == [1, 2] and plan[3].tolist() == [0, 2]


def test_global_plan_ranks_across_layers_with_a_minimum():
    scores = {0: torch.tensor([10.0, 9.0, 8.0, 7.0]), 1: torch.tensor([1.0, 0.0, 0.5, 0.2])}
    counts = global_counts(scores, 5, min_keep=1, normalise="none")
    assert counts == {0: 4, 1: 1}
    plan = plan_global(scores, 5, min_keep=1, normalise="none")
    assert plan[1].tolist() == [0]
    with pytest.raises(GluPruneError, match="minimum"):
        global_counts(scores, 3, min_keep=2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 6), size=st.integers(4, 64),
       fraction=st.floats(0.2, 0.95), multiple=st.sampled_from([1, 2, 4, 8]), normalise=st.sampled_from(
           ["standardise", "mean", "none"]))
def test_global_plans_never_exceed_the_budget_nor_grow_and_keep_the_minimum(seed, layers, size, fraction, multiple,
                                                                           normalise):
    g = torch.Generator().manual_seed(seed)
    scores = {i: torch.rand(size, generator=g) * (i + 1) for i in range(layers)}
    total = int(fraction * size * layers)
    min_keep = min(multiple, size)
    assume(-(-min_keep // multiple) * multiple * layers <= total)  # else the minimum alone exceeds the budget
    plan = plan_global(scores, total, min_keep, multiple, normalise)
    kept = {i: idx.numel() for i, idx in plan.items()}
    assert sum(kept.values()) <= total
    assert all(min_keep <= k <= size for k in kept.values())
    assert all(k % multiple == 0 or k == size for k in kept.values())
    assert all(torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel() for idx in plan.values())


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 5000), hidden=st.integers(1, 2000), ratio=st.floats(0.001, 0.999),
       multiple=st.integers(1, 128))
def test_kept_count_never_grows_and_respects_the_multiple(size, hidden, ratio, multiple):
    kept_share = math.floor(size * (1 - ratio) + 0.5)  # the protocol rounds the kept share half up
    assume(kept_share >= multiple)  # else no neuron is kept: test_targets_that_grow_or_keep_nothing
    keep = kept_count(size, hidden, Target(ratio=ratio, multiple_of=multiple))
    assert 1 <= keep <= size and keep % multiple == 0 and kept_share - multiple < keep <= kept_share
