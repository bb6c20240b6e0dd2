"""benchmarks.studies.heal_fair on a tiny model and the real corpora: the marks, the baseline and the table."""

import json

from tiny import save_tiny

from benchmarks.studies import heal_fair
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.run import calibrate
from pruning import PruneConfig, prune


def test_heal_fair_measures_pruned_and_baseline_runs_alike(tmp_path, data_dir, capsys):
    save_tiny(tmp_path / "m")
    base, tokenizer = load_model(str(tmp_path / "m"), dtype="float32")
    part = load_corpus("wikitext2", part="calibration", data_dir=data_dir)
    stats = calibrate(base, list(make_batches(tokenizer, part, seq_len=32, max_tokens=1024, batch_size=4)),
                      second_moment=True, holdout=0.125)
    stats.save(tmp_path / "s.safetensors")
    common = ["--model", str(tmp_path / "m"), "--corpus", "wikitext2", "--steps", "2,4",
              "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]
    heal_fair.main(common + ["--ratio", "0.5", "--stats", str(tmp_path / "s.safetensors")])
    heal_fair.main(common + ["--ratio", "0"])
    pruned = json.loads((tmp_path / "o" / "wikitext2-r0.5.json").read_text())
    tuned = json.loads((tmp_path / "o" / "wikitext2-r0.json").read_text())

    evaluation = load_corpus("wikitext2", part="evaluation", data_dir=data_dir)
    start = prune(base, stats, PruneConfig(ratio=0.5, method="hybrid", reconstruct="lstsq")).model
    assert pruned["points"][0]["perplexity"]["wikitext2"] == protocol_perplexity(start, tokenizer,
                                                                                 evaluation).perplexity
    assert tuned["points"][0]["perplexity"] == tuned["base"]  # the baseline starts as the unpruned model
    for run in (pruned, tuned):
        assert [p["steps"] for p in run["points"]] == [0, 2, 4] and run["planned_steps"] == 4
        minutes = [p["minutes"] for p in run["points"]]
        tokens = [p["tokens"] for p in run["points"]]
        assert minutes == sorted(minutes) and minutes[1] > 0
        assert 0 < tokens[1] < tokens[2] and tokens[0] == 0
        assert run["points"][-1]["perplexity"]["wikitext2"] != run["points"][0]["perplexity"]["wikitext2"]
    assert pruned["parameters"] < tuned["parameters"]

    capsys.readouterr()
    heal_fair.main(["--report", "--out", str(tmp_path / "o")])
    table = capsys.readouterr().out
    assert "| wikitext2 | 50% hybrid+lstsq, full |" in table and "| wikitext2 | unpruned, full |" in table
    last = pruned["points"][-1]["perplexity"]["wikitext2"]
    versus = heal_fair.mark_value(tuned, len(pruned["points"]) - 1, "wikitext2")
    assert f"| {last / versus:.3f} |" in table


def test_minute_marks_follow_the_training_clock(tmp_path, data_dir, monkeypatch):
    """--minutes on a fake clock of one second per step: the pilot measures 1 s a step, the schedule
    plans max(warm-up + 1, 6) steps and the run stops at its last mark, 6 s."""
    import importlib
    import itertools
    import types

    heal = importlib.import_module("pruning.heal")  # the module (the package also exports its function heal)
    ticks = itertools.count(0.0, 1.0)  # every step reads the clock twice: 1 s a step
    monkeypatch.setattr(heal, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    save_tiny(tmp_path / "m")
    heal_fair.main(["--model", str(tmp_path / "m"), "--corpus", "wikitext2", "--minutes", "0.05,0.1", "--ratio", "0",
                    "--data-dir", str(data_dir), "--out", str(tmp_path / "o")])
    run = json.loads((tmp_path / "o" / "wikitext2-r0.json").read_text())
    assert run["pilot_step_seconds"] == 1.0 and run["planned_steps"] == 11
    assert [(p["steps"], p["minutes"]) for p in run["points"]] == [(0, 0.0), (3, 0.05), (6, 0.1)]
