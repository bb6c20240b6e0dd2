"""``PruneConfig``: what to prune and how, validated once, in the library's own terms."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from calibrate.errors import ConfigError
from calibrate.resources import human_bytes, second_moment_bytes
from pruning.allocation import DEFAULT_SPREAD, check_spread
from pruning.local_mlp import Settings
from pruning.plan import Target, kept_count
from pruning.registry import (
    ALLOCATIONS,
    AUTO,
    AUTO_REFIT,
    DEFAULT_METHOD,
    METHODS,
    MLP_TARGETS,
    RECONSTRUCTIONS,
    REFIT_TARGETS,
    SCHEDULES,
    choice,
    needs_second_moment,
)

AUTO_SECOND_MOMENT_LIMIT = 2 << 30  # reconstruct=auto refits when one layer's x xᵀ needs at most this (I ≤ 16384)
REFIT_TOKENS_PER_COEFFICIENT = 5.0  # fitting tokens per kept neuron that reconstruct=auto asks of a refit
# (docs/reconstruct.md, benchmarks/studies/tokens_per_coefficient.py: below it the refit gains little or loses)
BUDGET_MARGIN = 1.1  # a raised budget's room for the held-out slice's rounding to whole batches


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run. Exactly one of ``ratio`` (fraction of neurons removed), ``expansion_ratio``
    (kept / hidden) or ``intermediate_size`` (kept per layer); every other field has a default.

    ``reconstruct="auto"`` becomes ``lstsq`` or ``none`` by :func:`resolve_reconstruct`, from the
    model's size and the statistics, never from the machine. ``layers`` limits pruning to those layers.
    """

    ratio: float | None = None
    expansion_ratio: float | None = None
    intermediate_size: int | None = None
    multiple_of: int = 1
    method: str = DEFAULT_METHOD
    allocation: str = "uniform"
    allocation_spread: float = DEFAULT_SPREAD
    reconstruct: str = "none"
    schedule: str = "one-shot"
    refit_target: str = "pruned"
    seed: int = 0
    layers: tuple[int, ...] | None = None
    mlp_target: str = "layer"
    mlp_steps: int = 32
    mlp_lr: float = 1e-4

    def __post_init__(self):
        self.target  # noqa: B018  (validates the target)
        choice(METHODS, "method", self.method)
        choice(ALLOCATIONS, "allocation", self.allocation)
        choice({**RECONSTRUCTIONS, AUTO: None}, "reconstruct", self.reconstruct)
        choice(SCHEDULES, "schedule", self.schedule)
        choice(REFIT_TARGETS, "refit_target", self.refit_target)
        check_spread(self.allocation_spread)
        check_local(self)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        layerwise = SCHEDULES[self.schedule].layerwise
        if layerwise and self.allocation != "uniform":
            raise ConfigError("allocation", self.allocation, "the sequential schedule cuts each layer before later "
                                                             "layers are measured: use uniform")
        if self.refit_target == "dense" and not layerwise:
            raise ConfigError("refit_target", "dense", "pairs the pruned and unpruned models layer by layer: use "
                                                       "the sequential schedule")
        refits_dense = self.reconstruct == AUTO or RECONSTRUCTIONS[self.reconstruct].dense_target
        if self.refit_target == "dense" and not refits_dense:
            raise ConfigError("refit_target", "dense", f"refits by least squares: use reconstruct lstsq, not "
                                                       f"{self.reconstruct}")
        if METHODS[self.method].steps and ALLOCATIONS[self.allocation].ranks_across:
            raise ConfigError("allocation", self.allocation, f"ranks standardised scores across layers, and "
                              f"{self.method} scores are removal steps that standardise to the same range in every "
                              f"layer (a nearly uniform plan): use uniform, owl or sensitivity")

    @property
    def local_settings(self) -> Settings:
        """The :class:`pruning.local_mlp.Settings` of ``reconstruct="mlp"`` (0 steps for ``lstsq-local``)."""
        adam = self.reconstruct in RECONSTRUCTIONS and RECONSTRUCTIONS[self.reconstruct].adam
        return Settings(steps=self.mlp_steps if adam else 0, lr=self.mlp_lr, seed=self.seed)

    @property
    def target(self) -> Target:
        return Target(self.ratio, self.expansion_ratio, self.intermediate_size, self.multiple_of)

    @property
    def layer_list(self) -> list[int] | None:
        """The selected layers as a list, None for every layer."""
        return list(self.layers) if self.layers is not None else None

    @property
    def needs_stats(self) -> bool:
        """Whether calibration statistics are needed (a data score, an owl allocation or a refit)."""
        return (METHODS[self.method].data or ALLOCATIONS[self.allocation].needs_stats
                or self.reconstruct != "none")

    @property
    def needs_second_moment(self) -> bool:
        return needs_second_moment(self.method, self.reconstruct)

    @property
    def needs_text(self) -> bool:
        """Whether calibration text itself is needed, not only statistics (sensitivity, sequential, a
        reconstruction that runs over the text)."""
        return (ALLOCATIONS[self.allocation].needs_text or SCHEDULES[self.schedule].layerwise
                or self.reconstruct != AUTO and RECONSTRUCTIONS[self.reconstruct].needs_text)

    def what_needs(self, need: str) -> str:
        """The settings that need ``need`` ('stats' or 'text') with the verb, e.g. "method 'hybrid' needs"."""
        parts = []
        if need == "stats" and METHODS[self.method].data:
            parts.append(f"method '{self.method}'")
        if (need == "stats" and ALLOCATIONS[self.allocation].needs_stats) or (
                need == "text" and ALLOCATIONS[self.allocation].needs_text):
            parts.append(f"allocation '{self.allocation}'")
        if need == "stats" and self.reconstruct != "none":
            parts.append(f"reconstruct '{self.reconstruct}'")
        if need == "text" and self.reconstruct != AUTO and RECONSTRUCTIONS[self.reconstruct].needs_text:
            parts.append(f"reconstruct '{self.reconstruct}'")
        if need == "text" and SCHEDULES[self.schedule].layerwise:
            parts.append(f"the {self.schedule} schedule")
        return " and ".join(parts) + (" need" if len(parts) > 1 else " needs")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def check_local(config: PruneConfig) -> None:
    """Refuse bad settings of the local reconstructions (mlp, lstsq-local) in one line."""
    choice(MLP_TARGETS, "mlp_target", config.mlp_target)
    steps = config.mlp_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError("mlp_steps", steps, "give a whole number of Adam steps, 1 or more (lstsq-local is the "
                                              "closed form without steps)")
    rate = config.mlp_lr
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ConfigError("mlp_lr", rate, "give a positive learning rate, e.g. 1e-4")
    local = config.reconstruct in RECONSTRUCTIONS and RECONSTRUCTIONS[config.reconstruct].local
    if local and not SCHEDULES[config.schedule].layerwise:
        raise ConfigError("reconstruct", config.reconstruct, "fits each layer on the model whose earlier layers are "
                                                             "already pruned: use the sequential schedule")


def refit_tokens(kept: int) -> int:
    """The fitting tokens that ``reconstruct="auto"`` asks of a refit keeping ``kept`` neurons per layer."""
    return math.ceil(REFIT_TOKENS_PER_COEFFICIENT * kept)


def widest_kept(config: PruneConfig, intermediate_sizes: list[int], hidden: int) -> int:
    """The neurons kept in the widest layer under ``config``'s target (the width a refit solves for)."""
    return kept_count(max(intermediate_sizes), hidden, config.target)


def resolve_reconstruct(config: PruneConfig, intermediate_sizes: list[int], has_second_moment: bool | None = None,
                        has_data: bool = True, fit_tokens: int | None = None,
                        hidden: int | None = None) -> tuple[PruneConfig, str]:
    """``config`` with ``reconstruct="auto"`` decided, and why (for the manifest).

    With statistics at hand (``has_second_moment`` not None) auto refits exactly when they hold
    second moments and, given ``fit_tokens`` and the model's ``hidden`` size, at least
    :func:`refit_tokens` fitting tokens for the widest layer's kept neurons; when calibrating
    (None), when one layer's second moment fits AUTO_SECOND_MOMENT_LIMIT (the budget is then
    :func:`calibration_budget`'s); without any calibration data (``has_data`` False), never. The
    model's sizes decide, never the machine's free memory: one command, one model everywhere.
    """
    if config.reconstruct != AUTO:
        return config, ""
    if not has_data:
        choose, why = "none", "no calibration data"
    elif has_second_moment is not None:
        choose = AUTO_REFIT if has_second_moment else "none"
        why = "the statistics hold second moments" if has_second_moment else \
            "the statistics have no second moments; calibrate with them for lstsq"
        if has_second_moment and fit_tokens is not None and hidden is not None:
            kept = widest_kept(config, intermediate_sizes, hidden)
            needed = refit_tokens(kept)
            if fit_tokens < needed:
                choose = "none"
                why = (f"{fit_tokens} fitting tokens for {kept} kept neurons, {fit_tokens / kept:.1f} per "
                       f"coefficient, fewer than the {REFIT_TOKENS_PER_COEFFICIENT:g} a refit needs; calibrate "
                       f"with at least {needed} fitting tokens for lstsq")
    else:
        per_layer = second_moment_bytes([max(intermediate_sizes)])
        choose = AUTO_REFIT if per_layer <= AUTO_SECOND_MOMENT_LIMIT else "none"
        why = f"one layer's second moment needs {human_bytes(per_layer)}" + (
            "" if choose == AUTO_REFIT else f", more than {human_bytes(AUTO_SECOND_MOMENT_LIMIT)}")
    return replace(config, reconstruct=choose), f"auto: {choose} ({why})"


def calibration_budget(kept: int, asked: int | None, default: int, holdout: float) -> tuple[int | None, str]:
    """(calibration tokens, why) for a refit keeping ``kept`` neurons per layer: ``default`` raised
    to give :func:`refit_tokens` fitting tokens once the ``holdout`` fraction is held out when the
    user ``asked`` for no budget; None (no refit) when the ``asked`` budget is smaller than that."""
    fitting = refit_tokens(kept)
    needed = math.ceil(BUDGET_MARGIN * fitting / (1 - holdout))
    if asked is None:
        if needed <= default:
            return default, ""
        return needed, (f"calibration budget raised from {default} to {needed} tokens: a refit of {kept} kept "
                        f"neurons needs {fitting} fitting tokens ({REFIT_TOKENS_PER_COEFFICIENT:g} per coefficient)")
    if asked >= needed:
        return asked, ""
    return None, (f"{asked} calibration tokens give {kept} kept neurons {asked * (1 - holdout) / kept:.1f} fitting "
                  f"tokens each, fewer than the {REFIT_TOKENS_PER_COEFFICIENT:g} a refit needs; --max-tokens "
                  f"{needed} or more for lstsq")
