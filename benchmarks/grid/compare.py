"""``compare``: calibrate on each corpus, prune every (method, ratio, corpus), evaluate on every corpus
(or calibrate on another list of corpora: ``calibration_corpora``)."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.deploy.lm_eval_tasks import harness, lm_eval_scores
from benchmarks.deploy.speed import device_name, measure_speed
from benchmarks.grid.spec import CorpusSpec, ModelSpec, equal_size_method, equal_size_models, grid_models
from benchmarks.grid.store import ResultStore, record_settings
from benchmarks.measures import parameter_count
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.manifest import read
from calibrate.models import load_model, pick_device, pick_dtype
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from calibrate.prompts import DEFAULT_REFERENCE
from calibrate.run import split_holdout
from calibrate.stats import ActivationStats
from calibrate.tasks import evaluate_task, load_task
from pruning.allocation import DEFAULT_SPREAD
from pruning.equal_size import EqualSizePlan, SizeProfile, plan, size_profile
from pruning.equal_size_models import Cell, build_plan
from pruning.heal import HealConfig
from pruning.prune import prune, prune_sequential
from pruning.registry import SCHEDULES, needs_second_moment
from pruning.workflow import HOLDOUT, CalibrationSettings, HealSettings, calibrate_corpus, heal_with_corpus

DEFAULT_METHODS = ["ppm", "hybrid", "wanda"]
DEFAULT_RATIOS = [0.2, 0.4]
EQUAL_SIZE_METHODS = ["depth-cosine", "hybrid", "both-hybrid"]  # the default methods with param_ratios
SPEED = "(speed)"
LM_EVAL = "(lm-eval)"
TASK = "task:"  # a labelled task's cells: "task:sms_spam"
TASK_FIGURES = ("balanced_accuracy", "balanced_accuracy_ci", "accuracy", "recall", "auc", "auc_ci",
                "plain_balanced_accuracy", "plain_recall", "n", "seconds")


@dataclass(frozen=True)
class GridOptions:
    """Every setting of a grid run but its model, corpora and folder (:func:`compare`'s keywords):
    evaluation (``eval_tokens``, ``eval_docs``, ``seq_len``), calibration (``calib_tokens``,
    ``calib_seq_len``, the allocation ``spread``; ``second_moment``, ``layer_importance``,
    ``skip_loss`` as the cells need them), healing rows, the extra columns (``speed``, ``lm_eval*``,
    ``tasks``/``task_*``), where it runs (``device``, ``dtype``, ``batch_size``) and ``progress``."""

    data_dir: str | Path | None = None
    eval_tokens: int = 8192
    eval_docs: int = 400
    seq_len: int = 512
    calib_tokens: int = 8192
    calib_seq_len: int = 128
    spread: float = DEFAULT_SPREAD
    batch_size: int = 4
    device: str | None = None
    dtype: str = "float32"
    speed: bool = False
    second_moment: bool = False
    heal_seq_len: int = 256
    lm_eval: list[str] | None = None
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None
    tasks: list[str] | None = None
    task_shots: int = 4
    task_size: int | None = None
    task_seed: int = 0
    task_reference: str | None = DEFAULT_REFERENCE
    layer_importance: bool = False
    skip_loss: bool = False
    progress: bool = True


class Grid:
    """One comparison run over a results folder; every finished cell is kept and skipped next time.

    A folder holds the results of one set of :meth:`settings`: a run with other settings is refused.
    """

    def __init__(self, model: str, corpora: list[CorpusSpec], out_dir: Path, options: GridOptions = GridOptions(),
                 calibration_corpora: list[CorpusSpec] | None = None, loaded: tuple | None = None):
        o = options
        self.model_name, self.corpora, self.out = model, corpora, Path(out_dir)
        self.calibration_specs = corpora if calibration_corpora is None else calibration_corpora
        self.data_dir, self.eval_tokens, self.eval_docs = o.data_dir, o.eval_tokens, o.eval_docs
        self.seq_len = o.seq_len
        self.calib_tokens, self.calib_seq_len, self.spread = o.calib_tokens, o.calib_seq_len, o.spread
        self.batch_size, self.progress, self.second_moment = o.batch_size, o.progress, o.second_moment
        self.heal_seq_len, self.dtype = o.heal_seq_len, o.dtype
        self.layer_importance, self.skip_loss = o.layer_importance, o.layer_importance and o.skip_loss
        self.speed_device = device_name(pick_device(o.device)) if o.speed else None
        self.lm_eval = ({"tasks": o.lm_eval, "include": o.lm_eval_include, "limit": o.lm_eval_limit}
                        if o.lm_eval else None)
        if o.lm_eval:
            harness()  # a missing extra fails before any work
        self.tasks = labelled_tasks(o.tasks or [], o.data_dir)  # a bad task fails before any work too
        self.task_options = {"shots": o.task_shots, "size": o.task_size, "seed": o.task_seed,
                             "reference": o.task_reference}
        self.out.mkdir(parents=True, exist_ok=True)
        record_settings(self.out, self.settings())
        self.store = ResultStore(self.out)
        self.extras: dict[str, tuple[ResultStore, object]] = {}  # per-model measurements beside perplexity
        if o.speed:
            self.extras[SPEED] = (ResultStore(self.out, "speed.json"), measure_speed)
        if o.lm_eval:
            self.extras[LM_EVAL] = (ResultStore(self.out, "lm_eval.json"), lambda m: lm_eval_scores(
                m, self.tokenizer, o.lm_eval, include_path=o.lm_eval_include, limit=o.lm_eval_limit))
        task_store = ResultStore(self.out, "tasks.json")  # one file, one cell per (model, task)
        for name in self.tasks:
            self.extras[TASK + name] = (task_store, lambda m, name=name: self.task_scores(m, name))
        self.base, self.tokenizer = loaded or load_model(model, device=o.device, dtype=o.dtype)
        self.eval_parts = {c.name: load_corpus(c.source, part="evaluation", data_dir=o.data_dir, name=c.name)
                           for c in corpora}
        self.stats: dict[str, ActivationStats] = {}
        self.calibration_parts: dict = {}

    def settings(self) -> dict:
        """Every setting a cell's result depends on (batch size and device change only its rounding;
        the device is kept for speed figures)."""
        settings = {
            "model": self.model_name, "dtype": str(pick_dtype(self.dtype)).removeprefix("torch."),
            "corpora": {c.name: c.source for c in self.corpora + self.calibration_specs},
            "calib_tokens": self.calib_tokens,
            "calib_seq_len": self.calib_seq_len, "second_moment": self.second_moment,
            "eval_tokens": self.eval_tokens, "eval_docs": self.eval_docs, "seq_len": self.seq_len,
            "allocation_spread": self.spread, "heal_seq_len": self.heal_seq_len,
        }
        if self.speed_device:
            settings["speed_device"] = self.speed_device
        if self.lm_eval:
            settings["lm_eval"] = self.lm_eval
        if self.tasks:
            settings["tasks"] = {name: {"source": source, "format": task.format.describe(), **self.task_options}
                                 for name, (source, task) in self.tasks.items()}
        return settings

    def task_scores(self, model, name: str) -> dict:
        """Few-shot figures of ``model`` on the labelled task ``name`` (calibrate/tasks.py)."""
        task = self.tasks[name][1]
        result = evaluate_task(model, self.tokenizer, task, **self.task_options, batch_size=max(self.batch_size, 16))
        return {k: v for k, v in result.to_dict().items() if k in TASK_FIGURES}

    def calibration_batches(self, corpus: str) -> list[dict]:
        """The calibration part of ``corpus`` as packed batches of calib_seq_len, up to calib_tokens."""
        return list(make_batches(self.tokenizer, self.calibration_part(corpus), seq_len=self.calib_seq_len,
                                 max_tokens=self.calib_tokens, batch_size=8, packing=True))

    def calibration_part(self, corpus: str):
        if corpus not in self.calibration_parts:
            spec = next(c for c in self.calibration_specs if c.name == corpus)
            self.calibration_parts[corpus] = load_corpus(spec.source, part="calibration", data_dir=self.data_dir,
                                                         name=corpus)
        return self.calibration_parts[corpus]

    def statistics(self, corpus: str) -> ActivationStats:
        """Calibration statistics of ``corpus``, computed once and kept in DIR/stats/ under a name
        that holds the calibration settings.

        With ``second_moment`` they also hold x xᵀ and a held-out eighth of the batches (for refits);
        with ``layer_importance`` every layer's cosine (and with ``skip_loss`` its skip loss on the
        last eighth), for depth cells.
        """
        if corpus not in self.stats:
            name = f"{corpus}-{self.calib_tokens}tokens-seq{self.calib_seq_len}"
            name += "-second-moment" if self.second_moment else ""
            name += ("-layer-importance" + ("-skip-loss" if self.skip_loss else "")) if self.layer_importance else ""
            path = self.out / "stats" / f"{name}.safetensors"
            if path.is_file():
                self.stats[corpus] = ActivationStats.load(path, model=self.base)
            else:
                batches = self.calibration_batches(corpus)
                if (self.second_moment or self.skip_loss) and len(batches) < 2:
                    raise GluPruneError(f"the held-out slice of a refit or a skip loss needs 2 calibration batches of "
                                        f"8 rows: {corpus} gave {len(batches)}; raise --calib-tokens to at least "
                                        f"{16 * self.calib_seq_len}, or use a larger corpus")
                meta = {"corpus": corpus, "source": self.calibration_part(corpus).source, "part": "calibration",
                        "seq_len": str(self.calib_seq_len), "model": self.model_name}
                with showing(False):
                    stats = calibrate_corpus(self.base, batches, meta, second_moment=self.second_moment,
                                             layer_importance=self.layer_importance, skip_loss=self.skip_loss)
                path.parent.mkdir(exist_ok=True)
                stats.save(path)
                self.stats[corpus] = stats
        return self.stats[corpus]

    def build(self, spec: ModelSpec):
        """The model of ``spec`` (the base itself, a healed copy of it, or a pruned copy) and the seconds
        building it took."""
        if spec.method is None and not spec.heal_steps:
            return self.base, 0.0
        start = time.perf_counter()
        model = copy.deepcopy(self.base) if spec.method is None else self.pruned(spec)  # a base copy: healed below
        if spec.heal_steps:
            part = self.calibration_part(spec.calibration)
            healing = HealConfig(steps=spec.heal_steps, lora_rank=spec.heal_lora)
            with showing(False):
                model, _ = heal_with_corpus(model, self.base, self.tokenizer, part, healing,
                                            teacher_name=self.model_name, run=HealSettings(seq_len=self.heal_seq_len))
        return model, time.perf_counter() - start

    def pruned(self, spec: ModelSpec):
        """The pruned model of ``spec``: an equal-size cell, a sequential or a one-shot prune of the base."""
        if spec.param_ratio is not None:
            return self.equal_size(spec).model
        config = spec.config(self.spread)
        if SCHEDULES[config.schedule].layerwise:
            return prune_sequential(self.base, self.calibration_batches(spec.calibration), config).model
        stats = self.statistics(spec.calibration) if spec.calibration else None
        text = split_holdout(self.calibration_batches(spec.calibration), HOLDOUT)[1] if config.needs_text else None
        return prune(self.base, stats, config, text_batches=text).model

    @cached_property
    def profile(self) -> SizeProfile:
        """The base model's sizes, for equal-size plans."""
        return size_profile(self.base)

    def equal_size_plan(self, spec: ModelSpec) -> EqualSizePlan:
        """The :mod:`pruning.equal_size` plan of an equal-size cell on the base model."""
        return plan(self.profile, spec.param_ratio, spec.plan_kind[0])

    def equal_size(self, spec: ModelSpec):
        """An equal-size cell's model: its plan built from the base, calibrated on its corpus."""
        _, score, method = spec.plan_kind
        part = self.calibration_part(spec.calibration) if spec.calibration else None
        settings = CalibrationSettings(seq_len=self.calib_seq_len, max_tokens=self.calib_tokens, batch_size=8,
                                       packing=True)  # as calibration_batches
        cell = Cell(layer_score=score or "cosine", method=method or "hybrid", reconstruct=spec.reconstruct)
        return build_plan(self.base, self.tokenizer, self.equal_size_plan(spec), cell,
                          stats=self.statistics(spec.calibration) if spec.calibration else None, corpus=part,
                          settings=settings)

    def evaluate(self, model, corpus: str):
        """Perplexity on the evaluation part: the first eval_tokens of documents, the first eval_docs messages."""
        return protocol_perplexity(model, self.tokenizer, self.eval_parts[corpus], self.eval_tokens, self.eval_docs,
                                   self.seq_len, self.batch_size)

    def done(self, model: str, corpus: str) -> bool:
        store = self.extras[corpus][0] if corpus in self.extras else self.store
        return store.done(model, corpus)

    def run(self, specs: list[ModelSpec]) -> tuple[list[dict], dict[str, list[dict]]]:
        """Every pending cell; returns the perplexity rows and each extra measurement's rows."""
        cells = [(s, c) for s in specs for c in [c.name for c in self.corpora] + list(self.extras)]
        todo = [(s, c) for s, c in cells if not self.done(s.key, c)]
        if len(todo) < len(cells):
            print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already in {self.store.path}, "
                  f"skipping them", file=sys.stderr)
        for corpus in dict.fromkeys(s.calibration for s, _ in todo if s.calibration):
            self.statistics(corpus)  # calibrate up front: a corpus too small fails before any long work
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="compare",
                   disable=not self.progress)
        for spec in specs:
            pending = [c for s, c in todo if s == spec]
            if not pending:
                continue
            model, prune_seconds = self.build(spec)
            for corpus in pending:
                bar.set_postfix_str(f"{spec.key} on {corpus}")
                if corpus in self.extras:
                    store, measure = self.extras[corpus]
                    store.add({"model": spec.key, "eval_corpus": corpus, **measure(model)})
                    bar.update()
                    continue
                result = self.evaluate(model, corpus)
                self.store.add({
                    "model": spec.key, "method": spec.method or "base",
                    "ratio": None if spec.param_ratio is not None else spec.ratio or 0.0,
                    "calibration_corpus": spec.calibration or "", "reconstruct": spec.reconstruct,
                    "schedule": spec.schedule, "heal_steps": spec.heal_steps, "heal_lora": spec.heal_lora,
                    "allocation": spec.allocation if spec.method else "", "eval_corpus": corpus,
                    "perplexity": result.perplexity, "tokens": result.tokens,
                    "parameters": parameter_count(model), "prune_seconds": round(prune_seconds, 3),
                    "eval_seconds": round(result.seconds, 2), **self.equal_size_figures(spec, model),
                })
                bar.update()
            if model is not self.base:
                del model
        bar.close()
        return self.store.rows, {name: store.rows for name, (store, _) in self.extras.items()}


    def equal_size_figures(self, spec: ModelSpec, model) -> dict:
        """An equal-size cell's target and shape: the fraction of all parameters, the layers removed
        (count and original indices) and the neurons kept per remaining layer; nothing for other cells."""
        if spec.param_ratio is None:
            return {}
        p = self.equal_size_plan(spec)
        removed = manifest.removed_layers if (manifest := read(model.config)) else []
        return {"param_ratio": spec.param_ratio, "remove_layers": len(removed),
                "removed_layers": ",".join(map(str, removed)),
                "intermediate_size": p.intermediate_size or self.profile.intermediate,
                "predicted_parameters": p.parameters}


def labelled_tasks(sources: list[str], data_dir) -> dict[str, tuple[str, object]]:
    """name -> (source, Task) for built-in task names and labelled files (named by their stem)."""
    tasks = {}
    for source in sources:
        task = load_task(source, data_dir=data_dir)
        if task.name in tasks:
            raise GluPruneError(f"--tasks names the task '{task.name}' twice: give each task once")
        tasks[task.name] = (source, task)
    return tasks


def check_calibration_corpora(corpora: list[CorpusSpec], calibration: list[CorpusSpec] | None) -> list[CorpusSpec]:
    """The calibration corpora (default: ``corpora``); a name in both lists must name one source."""
    if calibration is None:
        return corpora
    sources = {c.name: c.source for c in corpora}
    clash = next((c for c in calibration if sources.get(c.name, c.source) != c.source), None)
    if clash:
        raise GluPruneError(f"corpus '{clash.name}' is {sources[clash.name]} in --corpora and {clash.source} in "
                            f"--calibrate-on: give each name one source")
    return calibration


def compare(model: str, corpora: list[CorpusSpec], ratios: list[float] | None, methods: list[str], out_dir,
            reconstruct: list[str] = ("none",), schedules: list[str] = ("one-shot",), heal_steps: int = 0,
            allocations: list[str] = ("uniform",), calibration_corpora: list[CorpusSpec] | None = None,
            param_ratios: list[float] | None = None, heal_lora: int | None = None, **options) -> list[dict]:
    """Run (or resume) the grid and write results.{json,csv,md} and plots into ``out_dir``.

    Each method is pruned once per entry of ``ratios`` (fractions of GLU neurons; default
    0.2 and 0.4), of ``reconstruct``, of ``schedules`` (one-shot, sequential, sequential-dense) and
    of ``allocations``; a refit makes every corpus calibrate with the second moment. ``heal_steps``
    adds each pruned model healed (distilled from the base; by LoRA of rank ``heal_lora`` if given) on
    its calibration corpus, and the unpruned model healed alike on each corpus (the fair baseline).
    ``calibration_corpora`` (default: ``corpora``) are the corpora the models are calibrated on;
    every model is evaluated on ``corpora``.

    ``param_ratios`` instead of ``ratios``: every cell removes that fraction of the model's total
    parameters by the equal-size plans of :mod:`pruning.equal_size`: 'depth-cosine' and
    'depth-skip-loss' whole layers, a width method uniform neurons (refit by ``reconstruct``),
    'both-<method>' half by layers (cosine), the rest by that method's neurons. ``options``: the
    fields of :class:`GridOptions`.
    """
    from benchmarks.grid.report import write_reports

    if ratios and param_ratios:
        raise GluPruneError("--ratios (fractions of GLU neurons) and --param-ratios (fractions of all parameters) "
                            "are exclusive: give one of them")
    settings = GridOptions(**options)  # an unknown option fails here, before any work
    calibration = check_calibration_corpora(corpora, calibration_corpora)
    names = [c.name for c in calibration]
    if not param_ratios:
        specs = grid_models(methods, ratios or DEFAULT_RATIOS, names, reconstruct, schedules, heal_steps, allocations,
                            heal_lora)
        second_moment = any(needs_second_moment(m, r) for m in methods for r in reconstruct)
        grid = Grid(model, corpora, out_dir, replace(settings, second_moment=second_moment), calibration)
    else:
        if list(schedules) != ["one-shot"] or list(allocations) != ["uniform"]:
            raise GluPruneError("--param-ratios prunes neurons uniformly, one-shot: drop --schedule and --allocation")
        specs = equal_size_models(methods, param_ratios, names, reconstruct, heal_steps, heal_lora)
        kinds = [equal_size_method(m) for m in methods]
        second_moment = any(needs_second_moment(w, r) for kind, _, w in kinds if kind == "width" for r in reconstruct)
        loaded = load_model(model, device=settings.device, dtype=settings.dtype)
        profile = size_profile(loaded[0])
        for spec in specs[1:]:
            plan(profile, spec.param_ratio, spec.plan_kind[0])  # a plan refused before anything is written
        settings = replace(settings, second_moment=second_moment,
                           layer_importance=any(kind != "width" for kind, _, _ in kinds),
                           skip_loss=any(score == "skip-loss" for _, score, _ in kinds))
        grid = Grid(model, corpora, out_dir, settings, calibration, loaded=loaded)
    rows, extras = grid.run(specs)
    tasks = next((found for name, found in extras.items() if name.startswith(TASK)), [])
    return write_reports(rows, Path(out_dir), extras.get(SPEED, []), extras.get(LM_EVAL, []), tasks)
