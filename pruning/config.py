"""``PruneConfig``: what to prune and how, validated once, in the library's own terms."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from calibrate.errors import ConfigError
from calibrate.resources import human_bytes, second_moment_bytes
from pruning.allocation import DEFAULT_SPREAD, check_spread
from pruning.plan import Target
from pruning.registry import (
    ALLOCATIONS,
    AUTO,
    DEFAULT_METHOD,
    METHODS,
    RECONSTRUCTIONS,
    REFIT_TARGETS,
    SCHEDULES,
    choice,
    needs_second_moment,
)

AUTO_SECOND_MOMENT_LIMIT = 2 << 30  # reconstruct=auto refits when one layer's x xᵀ needs at most this (I ≤ 16384)


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

    def __post_init__(self):
        self.target  # noqa: B018  (validates the target)
        choice(METHODS, "method", self.method)
        choice(ALLOCATIONS, "allocation", self.allocation)
        choice({**RECONSTRUCTIONS, AUTO: None}, "reconstruct", self.reconstruct)
        choice(SCHEDULES, "schedule", self.schedule)
        choice(REFIT_TARGETS, "refit_target", self.refit_target)
        check_spread(self.allocation_spread)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.schedule == "sequential" and self.allocation != "uniform":
            raise ConfigError("allocation", self.allocation, "the sequential schedule cuts each layer before later "
                                                             "layers are measured: use uniform")
        if self.refit_target == "dense" and self.schedule != "sequential":
            raise ConfigError("refit_target", "dense", "pairs the pruned and unpruned models layer by layer: use "
                                                       "the sequential schedule")
        if self.refit_target == "dense" and self.reconstruct not in ("lstsq", AUTO):
            raise ConfigError("refit_target", "dense", f"refits by least squares: use reconstruct lstsq, not "
                                                       f"{self.reconstruct}")
        if self.method == "obs" and self.allocation == "global":
            raise ConfigError("allocation", "global", "ranks standardised scores across layers, and obs scores are "
                                                      "removal steps that standardise to the same range in every "
                                                      "layer (a nearly uniform plan): use uniform, owl or sensitivity")

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
        """Whether calibration text itself is needed, not only statistics (sensitivity, sequential)."""
        return ALLOCATIONS[self.allocation].needs_text or self.schedule == "sequential"

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
        if need == "text" and self.schedule == "sequential":
            parts.append("the sequential schedule")
        return " and ".join(parts) + (" need" if len(parts) > 1 else " needs")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


def resolve_reconstruct(config: PruneConfig, intermediate_sizes: list[int], has_second_moment: bool | None = None,
                        has_data: bool = True) -> tuple[PruneConfig, str]:
    """``config`` with ``reconstruct="auto"`` decided, and why (for the manifest).

    With statistics at hand (``has_second_moment`` not None) auto refits exactly when they hold
    second moments; when calibrating (None), when one layer's second moment fits
    AUTO_SECOND_MOMENT_LIMIT; without any calibration data (``has_data`` False), never. The
    model's sizes decide, never the machine's free memory: one command, one model everywhere.
    """
    if config.reconstruct != AUTO:
        return config, ""
    if not has_data:
        choose, why = "none", "no calibration data"
    elif has_second_moment is not None:
        choose = "lstsq" if has_second_moment else "none"
        why = "the statistics hold second moments" if has_second_moment else \
            "the statistics have no second moments; calibrate with them for lstsq"
    else:
        per_layer = second_moment_bytes([max(intermediate_sizes)])
        choose = "lstsq" if per_layer <= AUTO_SECOND_MOMENT_LIMIT else "none"
        why = f"one layer's second moment needs {human_bytes(per_layer)}" + (
            "" if choose == "lstsq" else f", more than {human_bytes(AUTO_SECOND_MOMENT_LIMIT)}")
    return replace(config, reconstruct=choose), f"auto: {choose} ({why})"
