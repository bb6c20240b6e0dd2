"""``compare``: calibrate on each corpus, prune every (method, ratio, corpus), evaluate on every corpus."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.grid import CorpusSpec, ModelSpec, grid_models
from benchmarks.lm_eval_tasks import harness, lm_eval_scores
from benchmarks.speed import measure_speed
from benchmarks.store import ResultStore
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.run import calibrate, calibrate_with_holdout, split_holdout
from calibrate.stats import ActivationStats
from pruning.allocation import DEFAULT_SPREAD
from pruning.heal import HealConfig, heal, training_batches
from pruning.pipeline import prune, prune_sequential
from pruning.reconstruct import needs_second_moment

DEFAULT_METHODS = ["ppm", "hybrid", "wanda"]
SPEED = "(speed)"
LM_EVAL = "(lm-eval)"


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Grid:
    """One comparison run over a results folder; every finished cell is kept and skipped next time."""

    def __init__(self, model: str, corpora: list[CorpusSpec], out_dir: Path, data_dir=None, eval_tokens=8192,
                 eval_docs=400, seq_len=512, calib_tokens=8192, calib_seq_len=128, spread=DEFAULT_SPREAD,
                 batch_size=4, device=None, dtype="float32", speed=False, second_moment=False, heal_seq_len=256,
                 lm_eval: list[str] | None = None, lm_eval_include: str | None = None, lm_eval_limit: int | None = None,
                 progress=True):
        self.model_name, self.corpora, self.out = model, corpora, Path(out_dir)
        self.data_dir, self.eval_tokens, self.eval_docs, self.seq_len = data_dir, eval_tokens, eval_docs, seq_len
        self.calib_tokens, self.calib_seq_len, self.spread = calib_tokens, calib_seq_len, spread
        self.batch_size, self.progress, self.second_moment = batch_size, progress, second_moment
        self.heal_seq_len = heal_seq_len
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = ResultStore(self.out)
        self.extras: dict[str, tuple[ResultStore, object]] = {}  # per-model measurements beside perplexity
        if speed:
            self.extras[SPEED] = (ResultStore(self.out, "speed.json"), measure_speed)
        if lm_eval:
            harness()  # a missing extra fails before any work
            self.extras[LM_EVAL] = (ResultStore(self.out, "lm_eval.json"), lambda m: lm_eval_scores(
                m, self.tokenizer, lm_eval, include_path=lm_eval_include, limit=lm_eval_limit))
        self.base, self.tokenizer = load_model(model, device=device, dtype=dtype)
        self.eval_parts = {c.name: load_corpus(c.source, part="evaluation", data_dir=data_dir, name=c.name)
                           for c in corpora}
        self.stats: dict[str, ActivationStats] = {}
        self.calibration_parts: dict = {}

    def calibration_batches(self, corpus: str) -> list[dict]:
        """The calibration part of ``corpus`` as packed batches of calib_seq_len, up to calib_tokens."""
        return list(make_batches(self.tokenizer, self.calibration_part(corpus), seq_len=self.calib_seq_len,
                                 max_tokens=self.calib_tokens, batch_size=8, packing=True))

    def calibration_part(self, corpus: str):
        if corpus not in self.calibration_parts:
            spec = next(c for c in self.corpora if c.name == corpus)
            self.calibration_parts[corpus] = load_corpus(spec.source, part="calibration", data_dir=self.data_dir,
                                                         name=corpus)
        return self.calibration_parts[corpus]

    def statistics(self, corpus: str) -> ActivationStats:
        """Calibration statistics of ``corpus``, computed once and kept in DIR/stats/.

        With ``second_moment`` they also hold x xᵀ and a held-out eighth of the batches (for refits).
        """
        if corpus not in self.stats:
            path = self.out / "stats" / f"{corpus}{'-second-moment' if self.second_moment else ''}.safetensors"
            if path.is_file():
                self.stats[corpus] = ActivationStats.load(path, model=self.base)
            else:
                batches = self.calibration_batches(corpus)
                meta = {"corpus": corpus, "source": self.calibration_part(corpus).source, "part": "calibration",
                        "seq_len": str(self.calib_seq_len), "model": self.model_name}
                if self.second_moment:
                    stats = calibrate_with_holdout(self.base, batches, second_moment=True, progress=False, meta=meta)
                else:
                    stats = calibrate(self.base, batches, progress=False, meta=meta)
                path.parent.mkdir(exist_ok=True)
                stats.save(path)
                self.stats[corpus] = stats
        return self.stats[corpus]

    def build(self, spec: ModelSpec):
        """The model of ``spec`` (the base itself, or a pruned copy) and the seconds pruning took."""
        if spec.method is None:
            return self.base, 0.0
        start = time.perf_counter()
        if spec.schedule.startswith("sequential"):
            fit, held = split_holdout(self.calibration_batches(spec.calibration))
            model = prune_sequential(copy.deepcopy(self.base), fit, held, method=spec.method, ratio=spec.ratio,
                                     reconstruct_with=spec.reconstruct, progress=False,
                                     refit_target="dense" if spec.schedule == "sequential-dense" else "pruned")
        else:
            stats = self.statistics(spec.calibration) if spec.calibration else None
            held = split_holdout(self.calibration_batches(spec.calibration))[1] \
                if spec.allocation == "sensitivity" else None
            model = prune(copy.deepcopy(self.base), stats=stats, method=spec.method, ratio=spec.ratio,
                          allocation=spec.allocation, reconstruct_with=spec.reconstruct, spread=self.spread,
                          sensitivity_batches=held)
        if spec.heal_steps:
            part = self.calibration_part(spec.calibration)
            batches = training_batches(self.tokenizer, part, seq_len=self.heal_seq_len, batch_size=4)
            model, _ = heal(model, self.base, batches, HealConfig(steps=spec.heal_steps), progress=False)
        return model, time.perf_counter() - start

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
                    "model": spec.key, "method": spec.method or "base", "ratio": spec.ratio or 0.0,
                    "calibration_corpus": spec.calibration or "", "reconstruct": spec.reconstruct,
                    "schedule": spec.schedule, "heal_steps": spec.heal_steps,
                    "allocation": spec.allocation if spec.method else "", "eval_corpus": corpus,
                    "perplexity": result.perplexity, "tokens": result.tokens,
                    "parameters": parameter_count(model), "prune_seconds": round(prune_seconds, 3),
                    "eval_seconds": round(result.seconds, 2),
                })
                bar.update()
            if model is not self.base:
                del model
        bar.close()
        return self.store.rows, {name: store.rows for name, (store, _) in self.extras.items()}


def compare(model: str, corpora: list[CorpusSpec], ratios: list[float], methods: list[str], out_dir,
            reconstruct: list[str] = ("none",), schedules: list[str] = ("one-shot",), heal_steps: int = 0,
            allocations: list[str] = ("uniform",), **options) -> list[dict]:
    """Run (or resume) the grid and write results.{json,csv,md} and plots into ``out_dir``.

    Each method is pruned once per entry of ``reconstruct``, of ``schedules`` (one-shot,
    sequential, sequential-dense) and of ``allocations``; a refit makes every corpus calibrate with
    the second moment. ``heal_steps`` adds each pruned model healed (distilled from the base) on its
    calibration corpus.
    """
    from benchmarks.report import write_reports

    specs = grid_models(methods, ratios, [c.name for c in corpora], reconstruct, schedules, heal_steps, allocations)
    second_moment = any(needs_second_moment(m, r) for m in methods for r in reconstruct)
    grid = Grid(model, corpora, out_dir, second_moment=second_moment, **options)
    rows, extras = grid.run(specs)
    return write_reports(rows, Path(out_dir), extras.get(SPEED, []), extras.get(LM_EVAL, []))
