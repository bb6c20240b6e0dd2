"""Before an offloaded prune starts: the memory each phase needs at its peak (calibration, refit,
rewrite), whether the statistics and refitted weights must be spilled to disk for it to fit, and
a one-line refusal, with the fix, when it cannot fit even so."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from calibrate.errors import GluPruneError
from calibrate.footprint import F64, Shapes, activation_bytes, calibration_peak, moment_bytes, rewrite_peak
from calibrate.resources import MemoryLimit, human_bytes
from calibrate.spill import layer_spill_bytes, spill_peak
from pruning.config import PruneConfig
from pruning.plan import kept_count
from pruning.registry import RECONSTRUCTIONS

log = logging.getLogger("glu_prune")

SHARE = 0.8  # of the memory limit a run plans to use: the rest for the libraries' own growth
STREAMS = 2  # second moments per layer: the fit's and the held-out slice's
SOLVER_WORKSPACE = 32 << 20  # LAPACK's own buffers on a first factorisation, at most (13-18 MiB at 1536-3072)


def refit_peak(width: int, kept: int, hidden: int, held_rows: int = 0) -> int:
    """Peak bytes of one layer's least-squares refit (:func:`pruning.registry.reconstruct_layer`
    with held-out statistics, :class:`pruning.reconstruct.RidgeCandidates`' working set).

    With a held-out second moment (``held_rows`` 0): the fit and held-out second moments as read
    (2 width²), the held-out one normalised by its token count while its products are formed (width²;
    the fit one is normalised in its kept columns only, width × K), the kept block ``S[K, K]`` of each
    (2 K²), ``W S[:, K]`` and the held-out ``W H`` (a width × K slice and hidden × width products),
    and each ridge's shifted matrix, its Cholesky factor and the solve's hidden × K results. With
    ``held_rows`` held-out activations (float32 as kept, fewer than the width) instead: the fit
    moment as read (width²) and its normalised kept columns (width × K), then the rows in float64
    with their kept columns and their outputs ``x Wᵀ``, then per ridge the shifted matrix
    factorised in place (3 K² with ``S[K, K]`` and the solver's copy), the rows' solve (K × rows) and
    its hidden × rows predictions and residuals; with fewer rows than outputs the best ridge's factor
    is made again once chosen, otherwise each ridge's weight is solved (hidden × K) and the best one
    kept; no refit's error reads the removed columns of the rows again. Float64 throughout,
    and the solver's workspace. Checked against the peak RSS of a refit in tests/test_spill.py."""
    workspace = min(SOLVER_WORKSPACE, 2 * F64 * kept * kept)
    if held_rows:
        h, rows = held_rows, held_rows * width // 2  # the float32 rows as kept, in float64 elements
        base = width * width + rows + hidden * width
        forming = base + max(kept * width, h * width + h * hidden + h * kept) + kept * kept + hidden * kept
        weights = 2 * hidden * kept if h >= hidden else 0  # this ridge's solved weight and the best one's
        solving = base + hidden * kept + 3 * kept * kept + 3 * h * kept + 4 * hidden * h + weights
        plain = base + hidden * kept + kept * kept + h * kept + 2 * h * width + h * hidden
        return F64 * max(forming, solving, plain) + workspace
    forming = 3 * width * width + kept * width + kept * kept + 3 * hidden * width + hidden * kept
    solving = 2 * width * width + 5 * kept * kept + 4 * hidden * kept
    return F64 * max(forming, solving) + workspace


@dataclass(frozen=True)
class Plan:
    """How an offloaded prune runs: whether it spills, each phase's peak (bytes) as it will run, the
    bytes the spill writes (statistics, refitted weights) and the most it holds at once
    (``disk_if_spilled``: each layer's statistics are removed once it is refitted)."""

    spill: bool
    peaks: dict[str, int]
    stats_disk: int
    refits_disk: int
    disk_if_spilled: int
    cut_as_calibrated: bool = False  # each layer refitted as it is calibrated (pruning.decide.CutAsCalibrated)

    @property
    def disk_written(self) -> int:
        return self.stats_disk + self.refits_disk


def plan_offloaded(shapes: Shapes, config: PruneConfig, limit: MemoryLimit | None, *, tokens: int,
                   batch_tokens: int, calibrating: bool, held_tokens: int | None = None,
                   cut_as_calibrated: bool = False) -> Plan:
    """The :class:`Plan` of pruning a model of ``shapes`` offloaded under ``limit``: in memory when every
    phase fits in ``SHARE`` of it with every layer's statistics and refits held, else spilled; refused
    (one line, the phase and the fix) when a phase does not fit even spilled. With no limit known it
    spills (what an offloaded prune did before it counted). ``held_tokens``: the held-out slice's real
    tokens (default an eighth of ``tokens``), which decide its spilled form and bytes
    (:func:`calibrate.spill.spill_bytes`, :func:`calibrate.spill.spill_peak`). With
    ``cut_as_calibrated`` (:func:`pruning.decide.cuts_as_calibrated`) each layer is refitted while it
    is calibrated: one layer's statistics are held, none spilled, only the refits; when that does not
    fit, the plan that refits after calibrating."""
    cut_needs = None
    if cut_as_calibrated and calibrating:
        try:
            return _plan(shapes, config, limit, tokens, batch_tokens, True, held_tokens, cut=True)
        except GluPruneError:  # its least (spilled) peak, said below if the fallback fits
            least = _plan(shapes, config, None, tokens, batch_tokens, True, held_tokens, cut=True)
            cut_needs = max(least.peaks.values())
    plan = _plan(shapes, config, limit, tokens, batch_tokens, calibrating, held_tokens)  # or refused
    if cut_needs is not None:
        log.info("refitting each layer as it is calibrated needs %s, more than %s of the %s available: "
                 "refitting after calibrating", human_bytes(cut_needs), human_bytes(SHARE * limit.bytes),
                 human_bytes(limit.bytes))
    return plan


def _plan(shapes: Shapes, config: PruneConfig, limit: MemoryLimit | None, tokens: int, batch_tokens: int,
          calibrating: bool, held_tokens: int | None, cut: bool = False) -> Plan:
    second = calibrating and config.needs_second_moment
    refit = RECONSTRUCTIONS[config.reconstruct].second_moment  # a least-squares refit: it solves
    kept = [kept_count(w, shapes.hidden, config.target) for w in shapes.widths]
    moments = sum(moment_bytes(w, STREAMS) for w in shapes.widths) if second else 0
    refits = shapes.hidden * sum(kept) * F64 if refit else 0  # held as the refit returns them
    largest = max(shapes.widths, default=0)
    held = tokens // 8 if held_tokens is None else held_tokens

    def rows(width: int) -> int:  # the held-out slice's rows, kept while no more than the width
        return held if second and held <= width else 0

    one_refit = max((refit_peak(w, k, shapes.hidden, rows(w)) for w, k in zip(shapes.widths, kept)),
                    default=0) if refit else 0
    streams = STREAMS if second else 0

    def peaks(spilled: bool) -> dict[str, int]:
        held_moments = moment_bytes(largest, STREAMS) if spilled and second else moments
        held_refits = (shapes.hidden * max(kept, default=0) * shapes.itemsize if refit else 0) if spilled else refits
        if cut:  # each refit runs once its layer's batches are done: beside the layer and the captured states
            refitting = shapes.layer_bytes + activation_bytes(shapes, tokens, 0) + one_refit  # moments in one_refit
            return {"calibration": max(calibration_peak(shapes, tokens, batch_tokens, streams), refitting)
                    + held_refits, "rewrite": rewrite_peak(shapes, held=held_refits)}
        return {"calibration": calibration_peak(shapes, tokens, batch_tokens, streams,
                                                held=0 if spilled else moments) if calibrating else 0,
                "refit": (0 if spilled else held_moments) + one_refit + held_refits,
                "rewrite": rewrite_peak(shapes, held=held_refits)}

    layer_stats = [layer_spill_bytes(w, held) if second and not cut else 0 for w in shapes.widths]
    layer_refits = [shapes.hidden * k * shapes.itemsize if refit else 0 for k in kept]
    disk = (sum(layer_stats), sum(layer_refits), spill_peak(layer_stats, layer_refits), cut)
    whole = peaks(spilled=False)
    if limit is not None and max(whole.values()) <= SHARE * limit.bytes:
        return Plan(False, whole, *disk)
    spilled = peaks(spilled=True)
    if limit is not None and max(spilled.values()) > SHARE * limit.bytes:
        phase, needed = max(spilled.items(), key=lambda item: item[1])
        raise GluPruneError(f"{PHASES[phase]} needs {human_bytes(needed)} ({WHAT[phase]}) but only "
                            f"{limit.text} is available: {FIX[phase]}")
    return Plan(True, spilled, *disk)


PHASES = {"calibration": "the calibration of one layer", "refit": "the refit of one layer",
          "rewrite": "the checkpoint's rewrite"}
WHAT = {"calibration": "its weights, the captured activations and its float64 second moments",
        "refit": "its float64 fit second moment, the held-out statistics and the solve's buffers",
        "rewrite": "the largest tensor, its changed copy and a shard"}
FIX = {"calibration": "fewer --max-tokens, or --reconstruct none (no second moments), or a larger memory limit",
       "refit": "--reconstruct none (or bias), or a larger memory limit",
       "rewrite": "a larger memory limit"}
