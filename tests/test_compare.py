import json

import pytest
import torch
from tiny import GRID_OPTIONS as OPTIONS
from tiny import HIDDEN, INTERMEDIATE, LAYERS, tiny_model

from benchmarks.deploy import speed
from benchmarks.grid import compare as compare_module
from benchmarks.grid.compare import compare
from benchmarks.grid.spec import CorpusSpec, ModelSpec, grid_models, parse_corpora
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.run import calibrate, split_holdout
from pruning import HealConfig, PruneConfig, heal, prune, prune_sequential
from pruning.heal import training_batches
from pruning.workflow import HOLDOUT

TIMINGS = ("prune_seconds", "eval_seconds")




def evaluated(model, tokenizer, corpus: CorpusSpec) -> float:
    """The protocol perplexity of ``model`` on ``corpus`` under OPTIONS, computed directly."""
    part = load_corpus(corpus.source, part="evaluation", name=corpus.name)
    return protocol_perplexity(model, tokenizer, part, OPTIONS["eval_tokens"], OPTIONS["eval_docs"],
                               OPTIONS["seq_len"]).perplexity


def calibration_batches(tokenizer, corpus: CorpusSpec) -> list[dict]:
    part = load_corpus(corpus.source, part="calibration", name=corpus.name)
    return list(make_batches(tokenizer, part, seq_len=OPTIONS["calib_seq_len"], max_tokens=OPTIONS["calib_tokens"],
                             batch_size=8, packing=True))


def pruned_parameters(base_parameters: int, ratio: float) -> int:
    """The exact parameter count of a tiny llama with every GLU layer cut to ``1 - ratio`` of its width."""
    kept = round(INTERMEDIATE * (1 - ratio))
    return base_parameters - LAYERS * 3 * HIDDEN * (INTERMEDIATE - kept)


def without_timings(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in TIMINGS} for r in rows),
                  key=lambda r: (r["model"], r["eval_corpus"]))


def test_grid_lists_base_static_once_and_data_methods_per_corpus():
    specs = grid_models(["ppm", "hybrid"], [0.2, 0.4], ["a", "b"])
    assert [s.key for s in specs] == ["base", "ppm-0.2-static", "hybrid-0.2-a", "hybrid-0.2-b",
                                      "ppm-0.4-static", "hybrid-0.4-a", "hybrid-0.4-b"]
    assert ModelSpec().key == "base"
    assert parse_corpora("wikitext2,mine=/x/y.txt") == [CorpusSpec("wikitext2", "wikitext2"),
                                                        CorpusSpec("mine", "/x/y.txt")]
    with pytest.raises(GluPruneError, match="NAME=PATH"):
        parse_corpora("wikitext2,/x/y.txt")
    with pytest.raises(GluPruneError, match="method='nope'"):
        grid_models(["nope"], [0.2], ["a"])


def test_compare_writes_tables_plots_and_resumes_without_recomputing(grid_setup, tmp_path, monkeypatch):
    model, corpora = grid_setup
    out = tmp_path / "run"
    calls = []
    real = compare_module.Grid.evaluate

    def counted(self, m, corpus):
        calls.append(corpus)
        if len(calls) == 5 and not getattr(counted, "interrupted", False):
            counted.interrupted = True
            raise KeyboardInterrupt
        return real(self, m, corpus)

    monkeypatch.setattr(compare_module.Grid, "evaluate", counted)
    with pytest.raises(KeyboardInterrupt):
        compare(model, corpora, [0.25], ["ppm", "hybrid"], out, **OPTIONS)
    assert len(json.loads((out / "results.json").read_text())) == 4
    calls.clear()
    rows = compare(model, corpora, [0.25], ["ppm", "hybrid"], out, **OPTIONS)
    assert len(calls) == 4 and len(rows) == 8  # (base, ppm, hybrid-law, hybrid-food) x 2 corpora
    assert {r["model"] for r in rows} == {"base", "ppm-0.25-static", "hybrid-0.25-law", "hybrid-0.25-food"}
    for name in ("results.csv", "results.md", "perplexity.png", "heatmap.png", "stats/law-512tokens-seq32.safetensors"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| hybrid (law) |" in table and "†" in table and "| law | food |" in table
    base, tokenizer = load_model(model, dtype="float32")
    base_parameters = sum(p.numel() for p in base.parameters())
    for row in rows:
        if row["model"] == "base":
            assert row["parameters"] == base_parameters
            corpus = next(c for c in corpora if c.name == row["eval_corpus"])
            assert row["perplexity"] == evaluated(base, tokenizer, corpus)
        else:
            assert row["parameters"] == pruned_parameters(base_parameters, 0.25)
    fresh = compare(model, corpora, [0.25], ["ppm", "hybrid"], tmp_path / "fresh", **OPTIONS)
    assert without_timings(rows) == without_timings(fresh)


def test_compare_speed_figures(grid_setup, tmp_path, monkeypatch):
    seconds = {"prefill": 0.25, "first_token": 0.05, "generate": 0.45}

    def fixed(fn, repeats, device):
        fn()
        return seconds[fn.__name__]

    monkeypatch.setattr(speed, "timed", fixed)
    model, corpora = grid_setup
    rows = compare(model, corpora[:1], [0.5], ["ppm"], tmp_path / "s", speed=True, **OPTIONS)
    base_parameters = sum(p.numel() for p in tiny_model("llama").parameters())
    assert [r["parameters"] for r in rows] == [base_parameters, pruned_parameters(base_parameters, 0.5)]
    for row in rows:
        assert row["size_mb"] == round(row["parameters"] * 4 / 2**20, 1)
        assert row["prefill_tokens_per_second"] == pytest.approx(8 * 128 / 0.25)
        assert row["decode_tokens_per_second"] == pytest.approx(31 / 0.4)
        assert row["ttft_ms"] == pytest.approx(50.0)
    assert (tmp_path / "s" / "speed.png").is_file()
    assert "Deployment figures" in (tmp_path / "s" / "results.md").read_text()


def test_compare_with_reconstruction_and_sequential_schedule(grid_setup, tmp_path):
    model, corpora = grid_setup
    out = tmp_path / "rec"
    rows = compare(model, corpora[:1], [0.25], ["hybrid"], out, reconstruct=["none", "lstsq"],
                   schedules=["one-shot", "sequential"], **OPTIONS)
    keys = {r["model"] for r in rows}
    assert keys == {"base", "hybrid-0.25-law", "hybrid-0.25-law-lstsq", "hybrid-0.25-law-sequential",
                    "hybrid-0.25-law-lstsq-sequential"}
    assert (out / "stats" / "law-512tokens-seq32-second-moment.safetensors").is_file()
    table = (out / "results.md").read_text()
    assert "hybrid +lstsq sequential (law)" in table
    ppl = {r["model"]: r["perplexity"] for r in rows if r["eval_corpus"] == "law"}
    base, tokenizer = load_model(model, dtype="float32")
    batches = calibration_batches(tokenizer, corpora[0])
    stats = calibrate(base, batches, second_moment=True, holdout=HOLDOUT)
    refit = PruneConfig(ratio=0.25, method="hybrid", reconstruct="lstsq")
    assert ppl["hybrid-0.25-law-lstsq"] == evaluated(prune(base, stats, refit).model, tokenizer, corpora[0])
    sequential = prune_sequential(base, batches, PruneConfig(ratio=0.25, method="hybrid", reconstruct="lstsq",
                                                             schedule="sequential")).model
    assert ppl["hybrid-0.25-law-lstsq-sequential"] == evaluated(sequential, tokenizer, corpora[0])
    with pytest.raises(GluPruneError, match="unknown schedule"):
        grid_models(["hybrid"], [0.2], ["a"], schedules=["later"])


def test_compare_rows_per_allocation(grid_setup, tmp_path):
    specs = grid_models(["ppm", "hybrid"], [0.5], ["a", "b"], allocations=["uniform", "global", "owl"],
                        schedules=["one-shot", "sequential"])
    assert [s.key for s in specs] == [
        "base", "ppm-0.5-static", "ppm-0.5-static-global", "ppm-0.5-a-owl", "ppm-0.5-b-owl",
        "ppm-0.5-a-sequential", "ppm-0.5-b-sequential", "hybrid-0.5-a", "hybrid-0.5-b", "hybrid-0.5-a-global",
        "hybrid-0.5-b-global", "hybrid-0.5-a-owl", "hybrid-0.5-b-owl", "hybrid-0.5-a-sequential",
        "hybrid-0.5-b-sequential"]
    dense = grid_models(["hybrid"], [0.5], ["a"], reconstruct=["none", "lstsq"], schedules=["sequential-dense"])
    assert [s.key for s in dense] == ["base", "hybrid-0.5-a-lstsq-sequential-dense"]
    with pytest.raises(GluPruneError, match="allocation='even'"):
        grid_models(["hybrid"], [0.2], ["a"], allocations=["even"])
    model, corpora = grid_setup
    rows = compare(model, corpora[:1], [0.25], ["hybrid"], tmp_path / "alloc", reconstruct=["lstsq"],
                   allocations=["uniform", "sensitivity"], **OPTIONS)
    by_model = {r["model"]: r for r in rows}
    sensitivity = by_model["hybrid-0.25-law-lstsq-sensitivity"]
    assert sensitivity["allocation"] == "sensitivity"
    base, tokenizer = load_model(model, dtype="float32")
    batches = calibration_batches(tokenizer, corpora[0])
    stats = calibrate(base, batches, second_moment=True, holdout=HOLDOUT)
    config = PruneConfig(ratio=0.25, method="hybrid", allocation="sensitivity", reconstruct="lstsq")
    pruned = prune(base, stats, config, text_batches=split_holdout(batches, HOLDOUT)[1]).model
    assert sensitivity["perplexity"] == evaluated(pruned, tokenizer, corpora[0])
    assert sensitivity["parameters"] == sum(p.numel() for p in pruned.parameters())
    assert "hybrid +lstsq sensitivity (law)" in (tmp_path / "alloc" / "results.md").read_text()


def test_compare_adds_healed_rows(grid_setup, tmp_path):
    model, corpora = grid_setup
    specs = grid_models(["ppm", "hybrid"], [0.5], ["law", "food"], heal_steps=3)
    assert [s.key for s in specs if s.heal_steps] == ["base-law-heal3", "base-food-heal3", "ppm-0.5-law-heal3",
                                                        "ppm-0.5-food-heal3", "hybrid-0.5-law-heal3",
                                                        "hybrid-0.5-food-heal3"]
    rows = compare(model, corpora[:1], [0.5], ["hybrid"], tmp_path / "heal", heal_steps=3, heal_seq_len=32,
                   **OPTIONS)
    ppl = {r["model"]: r["perplexity"] for r in rows}
    assert set(ppl) == {"base", "base-law-heal3", "hybrid-0.5-law", "hybrid-0.5-law-heal3"}
    base, tokenizer = load_model(model, dtype="float32")
    stats = calibrate(base, calibration_batches(tokenizer, corpora[0]))
    pruned = prune(base, stats, PruneConfig(ratio=0.5, method="hybrid")).model
    assert ppl["hybrid-0.5-law"] == evaluated(pruned, tokenizer, corpora[0])
    part = load_corpus(corpora[0].source, part="calibration", name="law")
    batches = training_batches(tokenizer, part, seq_len=32, batch_size=4)
    healed, _ = heal(pruned, base, batches, HealConfig(steps=3))
    assert ppl["hybrid-0.5-law-heal3"] == evaluated(healed, tokenizer, corpora[0])
    tuned, _ = heal(load_model(model, dtype="float32")[0], base, batches, HealConfig(steps=3))
    assert ppl["base-law-heal3"] == evaluated(tuned, tokenizer, corpora[0]) != ppl["base"]
    text = (tmp_path / "heal" / "results.md").read_text()
    assert "hybrid healed 3 (law)" in text and "| base healed 3 (law) |" in text


def test_compare_heals_by_lora(grid_setup, tmp_path):
    pytest.importorskip("peft")
    model, corpora = grid_setup
    specs = grid_models(["hybrid"], [0.5], ["law"], heal_steps=2, heal_lora=4)
    assert [s.key for s in specs if s.heal_steps] == ["base-law-heal2-lora4", "hybrid-0.5-law-heal2-lora4"]
    rows = compare(model, corpora[:1], [0.5], ["hybrid"], tmp_path / "lora", heal_steps=2, heal_lora=4,
                   heal_seq_len=32, **OPTIONS)
    ppl = {r["model"]: r["perplexity"] for r in rows}
    base, tokenizer = load_model(model, dtype="float32")
    part = load_corpus(corpora[0].source, part="calibration", name="law")
    batches = training_batches(tokenizer, part, seq_len=32, batch_size=4)
    tuned, _ = heal(load_model(model, dtype="float32")[0], base, batches, HealConfig(steps=2, lora_rank=4))
    full, _ = heal(load_model(model, dtype="float32")[0], base, batches, HealConfig(steps=2))
    assert ppl["base-law-heal2-lora4"] == evaluated(tuned, tokenizer, corpora[0]) != evaluated(full, tokenizer,
                                                                                              corpora[0])
    assert "hybrid healed 2 LoRA r4 (law)" in (tmp_path / "lora" / "results.md").read_text()


def test_resume_refuses_a_folder_made_with_other_settings(grid_setup, tmp_path):
    model, corpora = grid_setup
    out = tmp_path / "run"
    rows = compare(model, corpora[:1], [0.25], ["hybrid"], out, **OPTIONS)
    assert (out / "stats" / "law-512tokens-seq32.safetensors").is_file()
    saved = (out / "results.json").read_text()
    changes = [
        (dict(calib_tokens=256), "calib_tokens 512 -> 256"),
        (dict(calib_seq_len=16), "calib_seq_len 32 -> 16"),
        (dict(eval_tokens=128), "eval_tokens 256 -> 128"),
        (dict(eval_docs=5), "eval_docs 10 -> 5"),
        (dict(seq_len=32), "seq_len 64 -> 32"),
        (dict(spread=0.1), r"allocation_spread 0.\d+ -> 0.1"),
        (dict(dtype="float64"), "dtype float32 -> float64"),
        (dict(heal_seq_len=16), "heal_seq_len 256 -> 16"),
        (dict(model=str(tmp_path / "other")), f"model {model} -> {tmp_path / 'other'}"),
        (dict(corpora=[CorpusSpec("law", corpora[1].source)]), f"corpora.law {corpora[0].source} -> "),
        (dict(reconstruct=["lstsq"]), "second_moment False -> True"),
    ]
    for change, message in changes:
        arguments = {**dict(model=model, corpora=corpora[:1], ratios=[0.25], methods=["hybrid"], out_dir=out),
                     **OPTIONS, **change}
        with pytest.raises(GluPruneError, match=f"{message}.*another --out"):
            compare(**arguments)
    with pytest.raises(GluPruneError, match="calib_tokens 512 -> 256; eval_tokens 256 -> 128"):
        compare(model, corpora[:1], [0.25], ["hybrid"], out, **{**OPTIONS, "calib_tokens": 256, "eval_tokens": 128})
    assert (out / "results.json").read_text() == saved  # nothing mixed in
    again = compare(model, corpora[:1], [0.25], ["hybrid"], out, **OPTIONS, batch_size=2)  # rounding only
    assert again == rows
    (out / "settings.json").unlink()
    with pytest.raises(GluPruneError, match="older glu-prune.*another --out"):
        compare(model, corpora[:1], [0.25], ["hybrid"], out, **OPTIONS)


def test_a_folder_without_results_takes_the_new_settings(grid_setup, tmp_path):
    model, corpora = grid_setup
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"model": "a-typo", "calib_tokens": 99}))
    rows = compare(model, corpora[:1], [0.25], ["ppm"], out, **OPTIONS)
    assert len(rows) == 2
    assert json.loads((out / "settings.json").read_text())["model"] == model


@pytest.mark.parametrize("device, expected", [("cuda", ["run", "sync"] * 3), ("cpu", ["run"] * 3)])
def test_timing_waits_for_cuda_work_before_reading_the_clock(monkeypatch, device, expected):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    speed.timed(lambda: events.append("run"), 2, torch.device(device))
    assert events == expected  # the warm-up and each timed run, each followed by a wait on cuda


def test_calibration_only_corpora_calibrate_without_being_evaluated(grid_setup, tmp_path):
    model, corpora = grid_setup
    law, food = corpora
    rows = compare(model, [law], [0.25], ["hybrid"], tmp_path / "c", calibration_corpora=[law, food], **OPTIONS)
    assert {(r["model"], r["eval_corpus"]) for r in rows} == {("base", "law"), ("hybrid-0.25-law", "law"),
                                                               ("hybrid-0.25-food", "law")}
    base, tokenizer = load_model(model, dtype="float32")
    stats = calibrate(base, calibration_batches(tokenizer, food))
    by_food = next(r for r in rows if r["calibration_corpus"] == "food")
    assert by_food["perplexity"] == evaluated(prune(base, stats, PruneConfig(ratio=0.25, method="hybrid")).model,
                                              tokenizer, law)
    only = compare(model, [law], [0.25], ["hybrid"], tmp_path / "d", calibration_corpora=[food], **OPTIONS)
    assert {r["calibration_corpus"] for r in only} == {"", "food"}
    with pytest.raises(GluPruneError, match="law.*--calibrate-on"):
        compare(model, [law], [0.25], ["hybrid"], tmp_path / "e", calibration_corpora=[CorpusSpec("law", food.source)],
                **OPTIONS)
