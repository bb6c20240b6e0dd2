"""The cross-domain grid: which models to build and which corpora to evaluate them on (pure)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from calibrate.corpora import BUILTIN
from calibrate.errors import GluPruneError
from calibrate.layer_importance import SCORES
from pruning import registry
from pruning.allocation import DEFAULT_SPREAD
from pruning.config import PruneConfig
from pruning.equal_size import check_param_ratio
from pruning.registry import ALLOCATIONS, METHODS, RECONSTRUCTIONS, REFIT_TARGETS, choice


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus taking part in the grid: a built-in name, or NAME=PATH for a custom one."""

    name: str
    source: str


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid: the base (method None; healed: the fair baseline) or a pruned variant."""

    method: str | None = None
    ratio: float | None = None
    calibration: str | None = None
    reconstruct: str = "none"
    schedule: str = "one-shot"
    heal_steps: int = 0
    heal_lora: int | None = None  # LoRA rank of the healing (None: every weight trained)
    allocation: str = "uniform"
    param_ratio: float | None = None  # an equal-size cell: this fraction of all parameters removed

    @property
    def key(self) -> str:
        healed = f"heal{self.heal_steps}" + (f"-lora{self.heal_lora}" if self.heal_lora else "")
        if self.method is None:
            return f"base-{self.calibration}-{healed}" if self.heal_steps else "base"
        target = f"{self.ratio:g}" if self.param_ratio is None else f"p{self.param_ratio:g}"
        parts = [self.method, target, self.calibration or "static"]
        if self.reconstruct != "none":
            parts.append(self.reconstruct)
        if self.schedule != "one-shot":
            parts.append(self.schedule)
        if self.allocation != "uniform":
            parts.append(self.allocation)
        if self.heal_steps:
            parts.append(healed)
        return "-".join(parts)

    @property
    def plan_kind(self) -> tuple[str, str | None, str | None]:
        """(equal-size plan, layer score, width method) of an equal-size cell (:func:`equal_size_method`)."""
        return equal_size_method(self.method)

    def config(self, spread: float) -> PruneConfig:
        """The pruning configuration of this (pruned) model."""
        schedule, target = SCHEDULES[self.schedule]
        return PruneConfig(ratio=self.ratio, method=self.method, allocation=self.allocation, allocation_spread=spread,
                           reconstruct=self.reconstruct, schedule=schedule, refit_target=target)


def parse_corpora(text: str) -> list[CorpusSpec]:
    """'wikitext2,sms_spam,legal=docs/legal.txt' -> corpus specs (names unique)."""
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, source = item.partition("=")
        if not source:
            name, source = item, item
            if item not in BUILTIN:
                raise GluPruneError(f"corpus '{item}' in --corpora needs a name: write NAME=PATH, "
                                    f"e.g. mydomain={item}")
        specs.append(CorpusSpec(name.strip(), source.strip()))
    names = [s.name for s in specs]
    if not specs or len(set(names)) != len(names):
        raise GluPruneError(f"--corpora '{text}' must name at least one corpus, each name once")
    return specs


def parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise GluPruneError(f"{flag} '{text}' is not a comma-separated list of {kind.__name__}") from None
    if not values:
        raise GluPruneError(f"{flag} is empty")
    return values


DEFAULT_TARGET = "pruned"
# the grid's schedules → (registry schedule, refit target): each schedule, and each layerwise one toward
# each other refit target as "<schedule>-<target>" (sequential-dense)
SCHEDULES = {name: (name, DEFAULT_TARGET) for name in registry.SCHEDULES} | {
    f"{name}-{target}": (name, target) for name, s in registry.SCHEDULES.items() if s.layerwise
    for target in REFIT_TARGETS if target != DEFAULT_TARGET}
DATA_ALLOCATIONS = tuple(name for name, a in ALLOCATIONS.items() if a.needs_stats or a.needs_text)


def with_healed(models: list[ModelSpec], corpora: list[str], heal_steps: int,
                heal_lora: int | None = None) -> list[ModelSpec]:
    """``models``, then (``heal_steps`` > 0) the unpruned model healed alike on every corpus (the fair
    baseline: tuned as the pruned models are, but not pruned) and every pruned model healed on each
    corpus it was calibrated on (static ones: on every corpus), by LoRA of ``heal_lora`` if given."""
    if not heal_steps:
        return models
    heal = {"heal_steps": heal_steps, "heal_lora": heal_lora}
    return models + [ModelSpec(calibration=c, **heal) for c in corpora] + [
        replace(m, calibration=c, **heal) for m in models if m.method
        for c in ([m.calibration] if m.calibration else corpora)]


def grid_models(methods: list[str], ratios: list[float], corpora: list[str],
                reconstruct: list[str] = ("none",), schedules: list[str] = ("one-shot",),
                heal_steps: int = 0, allocations: list[str] = ("uniform",),
                heal_lora: int | None = None) -> list[ModelSpec]:
    """The base, then per ratio: static methods once, data-driven ones (and any reconstruction,
    sequential schedule or data-driven allocation) once per calibration corpus, for every schedule,
    reconstruction and allocation (sequential: uniform only; sequential-dense: lstsq only); with
    ``heal_steps`` each pruned model also healed on each corpus it was calibrated on (static ones:
    on every corpus)."""
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise GluPruneError(f"unknown schedule '{bad[0]}': choose from {', '.join(SCHEDULES)}")
    for method in methods:
        if method.startswith(("depth-", "both-")):
            raise GluPruneError(f"method '{method}' removes layers: give --param-ratios (fractions of all "
                                f"parameters), not --ratios (fractions of neurons)")
        choice(METHODS, "method", method)
    for allocation in allocations:
        choice(ALLOCATIONS, "allocation", allocation)
    models = [ModelSpec()]
    for ratio in ratios:
        for method in methods:
            for schedule in schedules:
                for rec in reconstruct:
                    if SCHEDULES[schedule][1] != DEFAULT_TARGET and not (
                            rec in RECONSTRUCTIONS and RECONSTRUCTIONS[rec].dense_target):
                        continue  # a refit toward the dense outputs is a least-squares refit
                    layerwise = registry.SCHEDULES[SCHEDULES[schedule][0]].layerwise
                    for allocation in ["uniform"] if layerwise else allocations:
                        data = METHODS[method].data or rec != "none" or layerwise or allocation in DATA_ALLOCATIONS
                        models += [ModelSpec(method, ratio, c, rec, schedule, allocation=allocation)
                                   for c in (corpora if data else [None])]
    models = list(dict.fromkeys(models))
    for model in models[1:]:
        model.config(DEFAULT_SPREAD)  # every combination is valid before any work
    return with_healed(models, corpora, heal_steps, heal_lora)


DEPTH_METHODS = tuple(f"depth-{score}" for score in SCORES)  # depth-cosine, depth-skip-loss
BOTH_LAYER_SCORE = "cosine"  # the layer score of both-<method> cells


def equal_size_method(method: str) -> tuple[str, str | None, str | None]:
    """'depth-cosine' -> ('depth', 'cosine', None); 'hybrid' -> ('width', None, 'hybrid');
    'both-hybrid' -> ('both', 'cosine', 'hybrid'): the equal-size plan of a grid method, the layer
    score that chooses its layers and the width method that scores its neurons."""
    if method.startswith("depth-"):
        if method not in DEPTH_METHODS:
            raise GluPruneError(f"unknown depth method '{method}': choose {' or '.join(DEPTH_METHODS)}")
        return "depth", method.removeprefix("depth-"), None
    if method.startswith("both-"):
        width = method.removeprefix("both-")
        if width not in METHODS:
            raise GluPruneError(f"method '{method}': '{width}' is not a width method; choose both- followed by one "
                                f"of {', '.join(METHODS)}")
        return "both", BOTH_LAYER_SCORE, width
    choice(METHODS, "method", method)
    return "width", None, method


def equal_size_models(methods: list[str], param_ratios: list[float], corpora: list[str],
                      reconstruct: list[str] = ("none",), heal_steps: int = 0,
                      heal_lora: int | None = None) -> list[ModelSpec]:
    """The base, then per fraction of all parameters: every method's equal-size cell, once per
    calibration corpus when it reads data (layers chosen by importance always do; a static width
    method without a refit once), width and both once per reconstruction (depth: no refit); with
    ``heal_steps``, :func:`with_healed`."""
    for ratio in param_ratios:
        check_param_ratio(ratio)
    models = [ModelSpec()]
    for ratio in param_ratios:
        for method in methods:
            kind, _, width = equal_size_method(method)
            for rec in ["none"] if kind == "depth" else reconstruct:
                data = kind != "width" or METHODS[width].data or rec != "none"
                models += [ModelSpec(method, calibration=c, reconstruct=rec, param_ratio=ratio)
                           for c in (corpora if data else [None])]
    models = list(dict.fromkeys(models))
    return with_healed(models, corpora, heal_steps, heal_lora)
