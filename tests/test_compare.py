import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from benchmarks import compare as compare_module
from benchmarks.compare import compare
from benchmarks.grid import CorpusSpec, ModelSpec, grid_models, parse_corpora
from calibrate.errors import GluPruneError

OPTIONS = dict(eval_tokens=256, eval_docs=10, seq_len=64, calib_tokens=512, calib_seq_len=32, progress=False)


@pytest.fixture
def setup(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpora = []
    for name, word in (("law", "contract court judge"), ("food", "bread salt oven")):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n\n".join(f"{word} {i} " * 8 for i in range(30)))
        corpora.append(CorpusSpec(name, str(path)))
    return str(model_dir), corpora


def test_grid_lists_base_static_once_and_data_methods_per_corpus():
    specs = grid_models(["ppm", "hybrid"], [0.2, 0.4], ["a", "b"])
    assert [s.key for s in specs] == ["base", "ppm-0.2-static", "hybrid-0.2-a", "hybrid-0.2-b",
                                      "ppm-0.4-static", "hybrid-0.4-a", "hybrid-0.4-b"]
    assert ModelSpec().key == "base"
    assert parse_corpora("wikitext2,mine=/x/y.txt") == [CorpusSpec("wikitext2", "wikitext2"),
                                                        CorpusSpec("mine", "/x/y.txt")]
    with pytest.raises(GluPruneError, match="NAME=PATH"):
        parse_corpora("wikitext2,/x/y.txt")
    with pytest.raises(GluPruneError, match="unknown method"):
        grid_models(["nope"], [0.2], ["a"])


def test_compare_writes_tables_plots_and_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    model, corpora = setup
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
    for name in ("results.csv", "results.md", "perplexity.png", "heatmap.png", "stats/law.safetensors"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "| hybrid (law) |" in table and "†" in table and "| law | food |" in table
    fresh = compare(model, corpora, [0.25], ["ppm", "hybrid"], tmp_path / "fresh", **OPTIONS)
    key = lambda r: (r["model"], r["eval_corpus"])  # noqa: E731
    assert [(key(r), r["perplexity"]) for r in sorted(rows, key=key)] == \
        [(key(r), r["perplexity"]) for r in sorted(fresh, key=key)]


def test_compare_speed_figures(setup, tmp_path):
    model, corpora = setup
    rows = compare(model, corpora[:1], [0.5], ["ppm"], tmp_path / "s", speed=True, **OPTIONS)
    assert all(r["prefill_tokens_per_second"] > 0 and r["ttft_ms"] > 0 for r in rows)
    assert (tmp_path / "s" / "speed.png").is_file()
    assert "Deployment figures" in (tmp_path / "s" / "results.md").read_text()


def test_compare_with_reconstruction_and_sequential_schedule(setup, tmp_path):
    model, corpora = setup
    out = tmp_path / "rec"
    rows = compare(model, corpora[:1], [0.25], ["hybrid"], out, reconstruct=["none", "lstsq"],
                   schedules=["one-shot", "sequential"], **OPTIONS)
    keys = {r["model"] for r in rows}
    assert keys == {"base", "hybrid-0.25-law", "hybrid-0.25-law-lstsq", "hybrid-0.25-law-sequential",
                    "hybrid-0.25-law-lstsq-sequential"}
    assert (out / "stats" / "law-second-moment.safetensors").is_file()
    table = (out / "results.md").read_text()
    assert "hybrid +lstsq sequential (law)" in table
    ppl = {r["model"]: r["perplexity"] for r in rows}
    assert ppl["hybrid-0.25-law-lstsq"] != ppl["hybrid-0.25-law"]
    assert ppl["hybrid-0.25-law-lstsq-sequential"] != ppl["hybrid-0.25-law-lstsq"]
    with pytest.raises(GluPruneError, match="unknown schedule"):
        grid_models(["hybrid"], [0.2], ["a"], schedules=["later"])


def test_compare_rows_per_allocation(setup, tmp_path):
    specs = grid_models(["ppm", "hybrid"], [0.5], ["a", "b"], allocations=["uniform", "global", "owl"],
                        schedules=["one-shot", "sequential"])
    assert [s.key for s in specs] == [
        "base", "ppm-0.5-static", "ppm-0.5-static-global", "ppm-0.5-a-owl", "ppm-0.5-b-owl",
        "ppm-0.5-a-sequential", "ppm-0.5-b-sequential", "hybrid-0.5-a", "hybrid-0.5-b", "hybrid-0.5-a-global",
        "hybrid-0.5-b-global", "hybrid-0.5-a-owl", "hybrid-0.5-b-owl", "hybrid-0.5-a-sequential",
        "hybrid-0.5-b-sequential"]
    dense = grid_models(["hybrid"], [0.5], ["a"], reconstruct=["none", "lstsq"], schedules=["sequential-dense"])
    assert [s.key for s in dense] == ["base", "hybrid-0.5-a-lstsq-sequential-dense"]
    with pytest.raises(GluPruneError, match="unknown allocation"):
        grid_models(["hybrid"], [0.2], ["a"], allocations=["even"])
    model, corpora = setup
    rows = compare(model, corpora[:1], [0.25], ["hybrid"], tmp_path / "alloc", reconstruct=["lstsq"],
                   allocations=["uniform", "sensitivity"], **OPTIONS)
    by_model = {r["model"]: r for r in rows}
    sensitivity = by_model["hybrid-0.25-law-lstsq-sensitivity"]
    assert sensitivity["allocation"] == "sensitivity"
    assert sensitivity["perplexity"] != by_model["hybrid-0.25-law-lstsq"]["perplexity"]
    assert "hybrid +lstsq sensitivity (law)" in (tmp_path / "alloc" / "results.md").read_text()


def test_compare_adds_healed_rows(setup, tmp_path):
    model, corpora = setup
    specs = grid_models(["ppm", "hybrid"], [0.5], ["law", "food"], heal_steps=3)
    assert [s.key for s in specs if s.heal_steps] == ["ppm-0.5-law-heal3", "ppm-0.5-food-heal3",
                                                        "hybrid-0.5-law-heal3", "hybrid-0.5-food-heal3"]
    rows = compare(model, corpora[:1], [0.5], ["hybrid"], tmp_path / "heal", heal_steps=3, heal_seq_len=32,
                   **OPTIONS)
    ppl = {r["model"]: r["perplexity"] for r in rows}
    assert set(ppl) == {"base", "hybrid-0.5-law", "hybrid-0.5-law-heal3"}
    assert ppl["hybrid-0.5-law-heal3"] != ppl["hybrid-0.5-law"]
    assert "hybrid healed 3 (law)" in (tmp_path / "heal" / "results.md").read_text()
