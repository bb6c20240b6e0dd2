"""Calibrate → prune (→ heal) in one call, from a model and a corpus: what the command line and the
comparison grid both run. In memory, or on an offloaded checkpoint one layer at a time."""

from __future__ import annotations

import copy
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from calibrate import resources
from calibrate.batches import make_batches, real_tokens
from calibrate.corpora import Corpus
from calibrate.errors import GluPruneError
from calibrate.files import check_output
from calibrate.footprint import shapes_of
from calibrate.glu import check_layers, glu_layers
from calibrate.layer_importance import LayerImportance
from calibrate.layerwise import Placement, calibrate_layerwise
from calibrate.manifest import Manifest, read, write
from calibrate.offload import OffloadChoice, Offloaded, offload_model, should_offload
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing, shown
from calibrate.run import calibrate, split_holdout
from calibrate.spill import check_disk
from calibrate.stats import ActivationStats, library_version
from pruning.config import PruneConfig, calibration_budget, resolve_reconstruct, widest_kept
from pruning.decide import CutAsCalibrated, Decided, cuts_as_calibrated
from pruning.depth import DepthConfig, measure_skip_loss, prune_depth
from pruning.heal import HealConfig, heal, training_batches
from pruning.plan import kept_count
from pruning.preflight import plan_offloaded, refit_peak
from pruning.prune import PruneResult, SequentialRun, prune, prune_sequential
from pruning.registry import ALLOCATIONS, AUTO, AUTO_REFIT, RECONSTRUCTIONS, SCHEDULES
from pruning.stream import Output, prune_checkpoint, prune_sequential_checkpoint, refit_store

log = logging.getLogger("glu_prune")
HOLDOUT = 0.125  # the held-out fraction of the calibration batches on which a refit chooses its ridge
DEFAULT_TOKENS = 8192  # calibration tokens when none are asked for (and no refit needs more)


@dataclass(frozen=True)
class CalibrationSettings:
    """How a corpus becomes calibration batches: rows of ``seq_len`` tokens, ``max_tokens`` in all
    (None: DEFAULT_TOKENS, raised when ``reconstruct="auto"`` refits a wide layer); ``packing``
    joins documents into full rows (default: on for documents, off for messages)."""

    seq_len: int = 128
    max_tokens: int | None = None
    batch_size: int = 8
    packing: bool | None = None

    @property
    def tokens(self) -> int:
        """The calibration budget these settings give: ``max_tokens``, else DEFAULT_TOKENS."""
        return self.max_tokens or DEFAULT_TOKENS


@dataclass(frozen=True)
class OffloadSettings:
    """How :func:`prune_offloaded` runs: its layers on ``device`` in ``dtype``; ``spill_dir``: where
    statistics and refits wait when spilled (default beside the output); ``notes`` for the manifest
    (e.g. :attr:`OffloadChoice.note`)."""

    device: torch.device
    dtype: torch.dtype
    spill_dir: str | Path | None = None
    notes: dict | None = None


@dataclass(frozen=True)
class HealSettings:
    """How :func:`heal_with_corpus` trains and measures: training rows of ``seq_len`` tokens in
    batches of ``batch_size``, ``max_tokens`` of them (None: ``HealConfig.steps``); perplexity on
    ``eval_parts`` (``eval_tokens``, ``eval_docs``) before and after; resumable checkpoints in
    ``checkpoint_dir`` (``resume``: continue from the latest)."""

    seq_len: int = 256
    batch_size: int = 4
    max_tokens: int | None = None
    eval_parts: dict[str, Corpus] | None = None
    eval_tokens: int = 8192
    eval_docs: int = 400
    checkpoint_dir: str | Path | None = None
    resume: bool = False


def calibration_batches(tokenizer, corpus: Corpus, settings: CalibrationSettings) -> list[dict]:
    return list(make_batches(tokenizer, corpus, seq_len=settings.seq_len, max_tokens=settings.tokens,
                             batch_size=settings.batch_size, packing=settings.packing))


def provenance(model_name: str, corpus: Corpus, settings: CalibrationSettings) -> dict[str, str]:
    return {"model": model_name, "corpus": corpus.name, "source": corpus.source, "part": corpus.part,
            "seq_len": str(settings.seq_len)}


def calibrate_corpus(model, batches: list[dict], meta: dict, *, second_moment: bool = False,
                     layers: list[int] | None = None, offloaded: Offloaded | None = None,
                     layer_importance: bool = False, skip_loss: bool = True) -> ActivationStats:
    """Statistics of ``batches`` (with second moments: and of a held-out slice for the refit's
    ridge); ``offloaded``: one decoder layer at a time from the checkpoint, each layer's
    statistics kept in files under its ``spill`` folder when given (not in memory), and handed to
    its ``finish`` as each is recorded (:class:`calibrate.layerwise.Placement`).
    ``layer_importance`` adds every layer's input-output cosine (same pass) and, with
    ``skip_loss``, each layer's skip loss on the held-out slice
    (:func:`pruning.depth.measure_skip_loss`); in memory only. Progress bars: :mod:`calibrate.progress`."""
    holdout = HOLDOUT if second_moment else 0.0
    loader = offloaded.loader if offloaded is not None else None
    if layer_importance and loader is not None:
        raise GluPruneError("layer importance needs the whole model in memory: drop --offload")
    if loader is None:
        stats = calibrate(model, batches, layers=layers, second_moment=second_moment, holdout=holdout, meta=meta,
                          layer_importance=layer_importance)
        if layer_importance and skip_loss:
            with showing(shown()):
                measure_skip_loss(model, stats.depth, split_holdout(batches, HOLDOUT)[1])
            stats.meta["layer_importance"] = stats.depth.kinds
        return stats
    return calibrate_layerwise(model, batches, holdout=holdout, layers=layers, second_moment=second_moment,
                               meta=meta, placement=Placement(loader, offloaded.device, offloaded.spill,
                                                                     offloaded.finish))


def resolve(config: PruneConfig, model, stats: ActivationStats | None, calibrating: bool,
            settings: CalibrationSettings | None = None) -> tuple[PruneConfig, dict, CalibrationSettings | None]:
    """``config`` with reconstruct auto decided (from the statistics when given, else the model's
    sizes when ``calibrating``, else none), the manifest notes saying why, and ``settings`` with the
    calibration budget a refit needs (:func:`pruning.config.calibration_budget`)."""
    auto = config.reconstruct == AUTO
    sizes, hidden = [g.intermediate_size for g in glu_layers(model)], model.config.hidden_size
    has_second = None if stats is None else stats.has_second_moment
    config, why = resolve_reconstruct(config, sizes, has_second, has_data=stats is not None or calibrating,
                                      fit_tokens=None if stats is None else stats.tokens, hidden=hidden)
    notes = {}
    if auto and stats is None and config.reconstruct == AUTO_REFIT and settings is not None:
        tokens, budget = calibration_budget(widest_kept(config, sizes, hidden), settings.max_tokens, DEFAULT_TOKENS,
                                            HOLDOUT)
        if tokens is None:
            config, why = replace(config, reconstruct="none"), f"auto: none ({budget})"
        else:
            settings = replace(settings, max_tokens=tokens)
            if budget:
                log.info("%s", budget)
                notes["calibration_budget"] = budget
    if why:
        log.info("reconstruct %s", why)
        notes["reconstruct_auto"] = why
    return config, notes, settings


def recheck_budget(config: PruneConfig, model, fit_tokens: int, notes: dict) -> PruneConfig:
    """For an auto refit, once the corpus is read: no refit when it gave fewer fitting tokens than it needs."""
    if "reconstruct_auto" not in notes or config.reconstruct != AUTO_REFIT:
        return config
    sizes, hidden = [g.intermediate_size for g in glu_layers(model)], model.config.hidden_size
    checked, why = resolve_reconstruct(replace(config, reconstruct=AUTO), sizes, True, fit_tokens=fit_tokens,
                                       hidden=hidden)
    if checked.reconstruct == "none":
        log.info("reconstruct %s", why)
        notes["reconstruct_auto"] = why
    return checked


def check_data(config: PruneConfig, stats: ActivationStats | None, corpus: Corpus | None) -> None:
    """Refuse a run that lacks the statistics or the calibration text its settings need."""
    if config.needs_text and corpus is None:
        raise GluPruneError(f"{config.what_needs('text')} calibration text: give a corpus")
    if config.needs_stats and stats is None and corpus is None:
        raise GluPruneError(f"{config.what_needs('stats')} calibration statistics: give statistics or a "
                            f"corpus")
    if SCHEDULES[config.schedule].layerwise and stats is not None:
        raise GluPruneError("the sequential schedule calibrates as it prunes: give a corpus, not statistics")


def runs_offloaded(config: PruneConfig) -> bool:
    """Whether ``config`` can prune an offloaded checkpoint (one-shot, streamable choices)."""
    return (SCHEDULES[config.schedule].streamable and ALLOCATIONS[config.allocation].streamable
            and (config.reconstruct == AUTO or RECONSTRUCTIONS[config.reconstruct].streamable))


def offload_choice(model_name: str, config: PruneConfig, *, calibrating: bool, dtype: torch.dtype,
                   asked: bool = False) -> OffloadChoice:
    """How to prune ``model_name``: offloaded when asked, or when the in-memory run (its weights, and
    the second moments it would calibrate when ``calibrating`` on a corpus) would not fit the memory
    limit and ``config`` runs offloaded. It changes how the model is computed, never which comes out."""
    second = calibrating and not SCHEDULES[config.schedule].layerwise and (config.needs_second_moment
                                                                or config.reconstruct == AUTO)
    refits = config.reconstruct == AUTO or RECONSTRUCTIONS[config.reconstruct].second_moment

    def working(sizes: list[int], hidden: int) -> int:
        return max(refit_peak(s, kept_count(s, hidden, config.target), hidden) for s in sizes) if refits else 0

    choice = should_offload(model_name, asked, dtype, second_moment=second, layers=config.layer_list,
                            working=working)
    if choice and not asked and not runs_offloaded(config):
        log.info("these settings do not run offloaded (one-shot, a streamable allocation and reconstruction "
                 "do): working in memory")
        return OffloadChoice(False, f"{choice.why}, but these settings run in memory only")
    return choice


def prune_with_corpus(model, tokenizer, config: PruneConfig, *, stats: ActivationStats | None = None,
                      corpus: Corpus | None = None, settings: CalibrationSettings = CalibrationSettings(),
                      inplace: bool = False, notes: dict | None = None) -> PruneResult:
    """Prune ``model``: with the given ``stats``, or calibrating on ``corpus`` first when the config
    needs statistics (with second moments for a refit), or calibrating as it prunes (sequential).
    ``notes`` go into the manifest (e.g. :attr:`OffloadChoice.note`). Progress bars: shown unless
    :func:`calibrate.progress.showing` says otherwise."""
    with showing(shown()):
        return _prune_with_corpus(model, tokenizer, config, stats, corpus, settings, inplace, notes)


def _prune_with_corpus(model, tokenizer, config: PruneConfig, stats: ActivationStats | None, corpus: Corpus | None,
                       settings: CalibrationSettings, inplace: bool, notes: dict | None) -> PruneResult:
    config, auto, settings = resolve(config, model, stats, corpus is not None, settings)
    notes = {**auto, **(notes or {})}
    check_data(config, stats, corpus)
    batches = calibration_batches(tokenizer, corpus, settings) if corpus is not None else []
    meta = provenance(model.config.name_or_path, corpus, settings) if corpus \
        else {}
    if SCHEDULES[config.schedule].layerwise:
        return prune_sequential(model, batches, config, holdout=HOLDOUT, inplace=inplace, meta=meta, notes=notes)
    if stats is None and config.needs_stats:
        stats = calibrate_corpus(model, batches, meta, second_moment=config.needs_second_moment,
                                 layers=config.layer_list)
        config = recheck_budget(config, model, stats.tokens, notes)
    text = split_holdout(batches, HOLDOUT)[1] if config.needs_text else None
    return prune(model, stats, config, inplace=inplace, text_batches=text, notes=notes)


def prune_offloaded(model_name: str, out: str | Path, config: PruneConfig, run: OffloadSettings, *,
                    stats: ActivationStats | None = None, corpus: Corpus | None = None,
                    settings: CalibrationSettings = CalibrationSettings(), force: bool = False) -> PruneResult:
    """Prune a local checkpoint into ``out`` without ever building the whole model: calibration one
    decoder layer at a time, then the checkpoint rewritten shard by shard, as ``run`` says. Before
    it starts, each phase's peak memory is counted (:func:`pruning.preflight.plan_offloaded`): when
    holding every layer's statistics and refitted weights would not fit (or whenever
    ``run.spill_dir`` is given), they wait in files in a temporary folder in ``run.spill_dir``
    (default: beside ``out``) until the rewrite, the bytes said and checked against the free disk
    first. Returns the result (its model the empty meta model with the pruned shapes:
    :func:`pruning.stream.prune_checkpoint`)."""
    check_output(out, force)
    device, spill_dir = run.device, run.spill_dir
    model, loader, tokenizer = offload_model(model_name, device, run.dtype)
    config, auto, settings = resolve(config, model, stats, corpus is not None, settings)
    notes = {**auto, **(run.notes or {})}
    check_data(config, stats, corpus)
    if SCHEDULES[config.schedule].layerwise:
        batches = calibration_batches(tokenizer, corpus, settings)
        run = SequentialRun(HOLDOUT, provenance(model_name, corpus, settings), Offloaded(loader, device), {})
        return prune_sequential_checkpoint(model, run, batches, config, Output(out, tokenizer, force), notes)
    calibrating = config.needs_stats and stats is None
    batches = calibration_batches(tokenizer, corpus, settings) if calibrating else None
    if calibrating and config.needs_second_moment:
        config = recheck_budget(config, model, real_tokens(split_holdout(batches, HOLDOUT)[0]), notes)
    plan = plan_offloaded(shapes_of(model, config.layer_list, run.dtype), config, resources.memory_limit(),
                          tokens=settings.tokens, batch_tokens=settings.batch_size * settings.seq_len,
                          calibrating=calibrating, held_tokens=held_tokens(batches),
                          cut_as_calibrated=calibrating and cuts_as_calibrated(model, config))
    folder = Path(spill_dir if spill_dir is not None else Path(out).absolute().parent)
    spilling = (plan.spill or spill_dir is not None) and plan.disk_if_spilled > 0
    what = "the refitted weights" if plan.cut_as_calibrated else "the spilled statistics and refitted weights"
    if spilling:
        if not folder.is_dir():
            raise GluPruneError(f"spill folder {folder} does not exist: create it or choose another --spill-dir")
        check_disk(folder, plan.disk_if_spilled, what, written=plan.disk_written)
    elif plan.disk_if_spilled:
        log.info("%s fit in memory (peak %s): nothing spilled to disk", what.replace("the spilled ", "every layer's "),
                 resources.human_bytes(max(plan.peaks.values())))
    if plan.cut_as_calibrated:
        log.info("each layer is refitted as it is calibrated: one layer's second moments at a time, never spilled")
        notes["refit_when"] = "each layer as it was calibrated (the seconds recorded exclude its scoring and refit)"
    with spill_folder(folder, Path(out).name, spilling) as spill:
        decided = Decided(refits=refit_store(spill, loader.dtype)) if plan.cut_as_calibrated else None
        if calibrating:
            stats = calibrate_corpus(model, batches, provenance(model_name, corpus, settings),
                                     second_moment=config.needs_second_moment, layers=config.layer_list,
                                     offloaded=Offloaded(loader, device, spill,
                                                         CutAsCalibrated(model, config, decided) if decided else None))
        return prune_checkpoint(model, loader, stats, config, Output(out, tokenizer, force), notes=notes,
                                spill=spill, decided=decided)


def held_tokens(batches: list[dict] | None) -> int | None:
    """The real tokens of the held-out slice :func:`calibrate_corpus` takes from ``batches``."""
    if not batches or len(batches) < 2:
        return None
    return real_tokens(split_holdout(batches, HOLDOUT)[1])


@contextmanager
def spill_folder(parent: Path, name: str, wanted: bool):
    """A temporary folder ``.NAME.stats-*`` in ``parent`` (removed afterwards), or None when not ``wanted``."""
    if not wanted:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f".{name}.stats-", dir=parent) as spill:
        yield spill


def heal_with_corpus(student, teacher, tokenizer, corpus: Corpus, config: HealConfig, *, teacher_name: str,
                     run: HealSettings = HealSettings()):
    """Distil ``student`` from ``teacher`` on ``corpus``'s calibration part, measuring perplexity on
    ``run.eval_parts`` before and after; the healed model's manifest gains a ``healing`` section.
    ``run.max_tokens`` sets the number of steps from the training tokens instead of ``config.steps``."""
    seq_len, batch_size, max_tokens = run.seq_len, run.batch_size, run.max_tokens
    eval_parts, eval_tokens, eval_docs = run.eval_parts, run.eval_tokens, run.eval_docs
    batches = training_batches(tokenizer, corpus, seq_len=seq_len, batch_size=batch_size)
    if max_tokens is not None:
        per_step = max(1, sum(int(b["attention_mask"].sum()) for b in batches) // len(batches))
        steps = -(-max_tokens // per_step)
        config = replace(config, steps=steps, warmup_steps=min(config.warmup_steps, steps // 10))

    def measure(model) -> dict[str, float]:
        return {name: protocol_perplexity(model, tokenizer, part, eval_tokens, eval_docs).perplexity
                for name, part in (eval_parts or {}).items()}

    manifest = read(student.config) or Manifest([], base_model=teacher_name)
    before = measure(student)
    healed, history = heal(student, teacher, batches, config, checkpoint_dir=run.checkpoint_dir, resume=run.resume)
    healing = {
        "teacher": teacher_name, "corpus": corpus.name, "source": corpus.source, "part": corpus.part,
        "seq_len": seq_len, "batch_size": batch_size, "config": asdict(config), "steps": len(history),
        "tokens": sum(h["tokens"] for h in history), "seconds": history[-1]["seconds"] if history else 0.0,
        "final_loss": history[-1]["loss"] if history else None,
        "perplexity_before": before, "perplexity_after": measure(healed),
    }
    write(healed.config, manifest.updated(intermediate_sizes=[g.intermediate_size for g in glu_layers(healed)],
                                          library_version=library_version(), healing=healing))
    return healed, healing


def depth_importance(model, tokenizer, depth: DepthConfig, stats: ActivationStats | None, corpus: Corpus | None,
                     settings: CalibrationSettings) -> tuple[LayerImportance, dict]:
    """(the layer importance ``depth`` chooses by, its provenance): from ``stats`` when they hold it,
    else measured on ``corpus``."""
    skip = depth.score == "skip-loss"
    if stats is not None and stats.depth is not None and (not skip or stats.depth.skip_loss is not None):
        return stats.depth, stats.meta
    if corpus is None:
        lacking = "no statistics" if stats is None else \
            "these statistics hold no " + ("skip loss" if stats.depth else "layer importance")
        raise GluPruneError(f"choosing layers by {depth.score} needs layer importance ({lacking}): give a corpus, "
                            f"or statistics from glu-prune calibrate --layer-importance")
    meta = provenance(model.config.name_or_path, corpus, settings)
    measured = calibrate_corpus(model, calibration_batches(tokenizer, corpus, settings), meta, layer_importance=True,
                                skip_loss=skip)
    return measured.depth, measured.meta


def prune_depth_with_corpus(model, tokenizer, depth: DepthConfig, config: PruneConfig | None = None, *,
                            stats: ActivationStats | None = None, corpus: Corpus | None = None,
                            settings: CalibrationSettings = CalibrationSettings(),
                            inplace: bool = False) -> PruneResult:
    """Remove ``depth``'s decoder layers; then, with a width ``config``, calibrate the remaining model
    on ``corpus`` and prune its neurons (:func:`prune_with_corpus`). One manifest records both: its
    per-layer fields (and ``config.layers``) refer to the remaining layers, ``depth.kept_layers``
    maps them to the original ones. Layers chosen by importance take it from ``stats`` (of the
    unpruned model) when they hold it, else from a calibration on ``corpus``."""
    layers = len(glu_layers(model))
    depth.check(layers)
    if stats is not None:
        stats.check_model(model)
    if config is not None:
        sizes = [g.intermediate_size for g in glu_layers(model)]
        needs = resolve_reconstruct(config, sizes, has_data=corpus is not None)[0]
        if (needs.needs_stats or needs.needs_text) and corpus is None:
            raise GluPruneError("after removing layers, the neurons are chosen on the remaining model: give a "
                                "corpus to calibrate it (statistics of the unpruned model do not describe it)")
        if config.layers is not None:
            check_layers(config.layer_list, layers - depth.count)
    importance, used = (None, None) if depth.explicit else depth_importance(model, tokenizer, depth, stats, corpus,
                                                                            settings)
    model = model if inplace else copy.deepcopy(model)
    result = prune_depth(model, depth, importance, inplace=True, statistics=used)
    if config is None:
        return result
    width = prune_with_corpus(result.model, tokenizer, config, corpus=corpus, settings=settings, inplace=True)
    manifest = read(width.model.config).updated(depth=result.manifest.depth)
    return PruneResult(width.model, width.plan, write(width.model.config, manifest))
