"""The registry is the one place a strategy is named: one new entry is a working allocation, and
no product module dispatches on a strategy's name."""

import ast
from pathlib import Path

import torch
from tiny import stats_for, tiny_model

from pruning import PruneConfig, prune
from pruning.allocators import Spread
from pruning.registry import ALLOCATIONS, RECONSTRUCTIONS, SCHEDULES, Allocation

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ["calibrate", "pruning", "glu_prune_cli", "benchmarks/grid", "benchmarks/deploy"]
FIELDS = {"allocation": ALLOCATIONS, "reconstruct": RECONSTRUCTIONS, "schedule": SCHEDULES}


class Deeper(Spread):
    """A test allocation: later layers keep more (importance = the layer index)."""

    def measurer(self, run):
        return lambda layer, scores, fit: float(layer.index)

    def importance(self, run, scores, measured):
        return dict(measured)


def test_one_registry_entry_is_a_working_allocation(monkeypatch):
    monkeypatch.setitem(ALLOCATIONS, "deeper", Allocation("later layers keep more", Deeper()))
    model = tiny_model("llama")
    result = prune(model, stats_for(model), PruneConfig(ratio=0.25, allocation="deeper", allocation_spread=0.2))
    sizes = result.manifest.intermediate_sizes
    assert sum(sizes) == 3 * 48 and sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert result.manifest.allocation == "deeper" and result.manifest.extra["layer_importance"] == {
        "0": 0.0, "1": 1.0, "2": 2.0}
    assert [torch.equal(k, k.sort().values) for k in result.plan.values()] == [True] * 3


def name_comparisons(tree: ast.AST) -> list[str]:
    """``x.allocation == "owl"``-style comparisons (or ``in`` a tuple of names) of a strategy field
    with a name its registry table holds; "none" and the defaults are values, not dispatch."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        fields = [s.attr for s in sides if isinstance(s, ast.Attribute) and s.attr in FIELDS]
        names = [c.value for s in sides for c in ([s] if isinstance(s, ast.Constant) else getattr(s, "elts", []))
                 if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        for field in fields:
            found += [f"{field} ~ {n}" for n in names
                      if n in FIELDS[field] and n not in ("none", "uniform", "one-shot")]
    return found


def test_no_product_module_dispatches_on_a_strategy_name():
    hits = {str(p.relative_to(REPO)): name_comparisons(ast.parse(p.read_text()))
            for folder in PRODUCT for p in sorted((REPO / folder).rglob("*.py"))}
    assert {p: h for p, h in hits.items() if h} == {}


def test_the_checker_sees_a_planted_dispatch():
    planted = 'if config.allocation == "owl":\n    pass\nif config.reconstruct in ("lstsq", "bias"):\n    pass\n'
    assert name_comparisons(ast.parse(planted)) == ["allocation ~ owl", "reconstruct ~ lstsq", "reconstruct ~ bias"]
