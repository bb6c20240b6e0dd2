"""The notebooks in notebooks/ run top to bottom (CI budgets) and their key figures are the library's.

Each notebook writes its key figures to $GLU_NB_FIGURES; each test recomputes them here with the
library called directly on the same settings. A notebook that drifts from the API raises while it
executes (a renamed argument, a moved function) or reports other figures than the library does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CI = {"GLU_NB_CALIB_TOKENS": 1024, "GLU_NB_EVAL_TOKENS": 512, "GLU_NB_EVAL_DOCS": 16, "GLU_NB_SEQ_LEN": 128,
      "GLU_NB_TASK_SIZE": 8}
CORPORA = ("wikitext2", "sms_spam")

pytestmark = pytest.mark.slow


def run_notebook(name: str, tmp_path: Path, monkeypatch) -> dict:
    """Execute ``notebooks/NAME.ipynb`` in a fresh kernel (this checkout first on its path) with the CI
    budgets; returns the figures it wrote."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    figures = tmp_path / f"{name}.json"
    for key, value in CI.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("GLU_NB_FIGURES", str(figures))
    monkeypatch.setenv("GLU_NB_WORK", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return json.loads(figures.read_text())


def ppl(model, tok, name: str) -> float:
    from calibrate import load_corpus
    from calibrate.perplexity import protocol_perplexity

    return protocol_perplexity(model, tok, load_corpus(name, part="evaluation"), eval_tokens=CI["GLU_NB_EVAL_TOKENS"],
                               eval_docs=CI["GLU_NB_EVAL_DOCS"], seq_len=CI["GLU_NB_SEQ_LEN"]).perplexity


def batches(tok, corpus, batch_size: int = 8):
    from calibrate import make_batches

    return make_batches(tok, corpus, seq_len=128, max_tokens=CI["GLU_NB_CALIB_TOKENS"], batch_size=batch_size)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_digest(plan) -> str:
    return hashlib.sha256(str({i: plan[i].tolist() for i in sorted(plan)}).encode()).hexdigest()[:16]


def test_static_width_pruning(data_dir, smollm2, tmp_path, monkeypatch):
    from pruning import PruneConfig, prune

    figures = run_notebook("1-static-width-pruning", tmp_path, monkeypatch)
    model, tok = smollm2
    assert figures["settings"] == {"eval_tokens": CI["GLU_NB_EVAL_TOKENS"], "seq_len": CI["GLU_NB_SEQ_LEN"]}
    assert figures["base_params"] == n_params(model)
    assert figures["base_wikitext2"] == pytest.approx(ppl(model, tok, "wikitext2"), rel=1e-4)
    rows = {(r["method"], r["expansion_ratio"]): r for r in figures["rows"]}
    assert set(rows) == {(m, e) for m in ("ppm", "maw") for e in (2.4, 2.0, 1.6)}
    for method in ("ppm", "maw"):
        small = prune(model, None, PruneConfig(expansion_ratio=1.6, method=method)).model
        assert rows[method, 1.6]["kept"] == 922 == small.config.intermediate_size
        assert rows[method, 1.6]["params"] == n_params(small)
        assert rows[method, 1.6]["wikitext2"] == pytest.approx(ppl(small, tok, "wikitext2"), rel=1e-4)


def test_data_driven_pruning(data_dir, smollm2, tmp_path, monkeypatch):
    from calibrate import calibrate, load_corpus
    from pruning import PruneConfig, prune

    figures = run_notebook("2-data-driven-pruning", tmp_path, monkeypatch)
    model, tok = smollm2
    labels = {"wikitext2": "WikiText-2", "sms_spam": "SMS"}
    for cal in CORPORA:
        stats = calibrate(model, batches(tok, load_corpus(cal, part="calibration")))
        result = prune(model, stats, PruneConfig(ratio=0.2, method="hybrid"))
        assert figures["plans"][cal] == plan_digest(result.plan)
        row = figures["cross"][f"hybrid 20%, calibrated on {labels[cal]}"]
        for name in CORPORA:
            assert row[name] == pytest.approx(ppl(result.model, tok, name), rel=1e-4)


def test_static_against_data_driven(data_dir, smollm2, tmp_path, monkeypatch):
    from pruning import PruneConfig, prune

    figures = run_notebook("3-static-vs-data-driven", tmp_path, monkeypatch)
    model, tok = smollm2
    static = prune(model, None, PruneConfig(ratio=0.2, method="ppm")).model
    for name in CORPORA:
        assert figures["perplexity"]["base"][name] == pytest.approx(ppl(model, tok, name), rel=1e-4)
        assert figures["perplexity"]["static ppm 20%"][name] == pytest.approx(ppl(static, tok, name), rel=1e-4)
    assert set(figures["perplexity"]) == {"base", "static ppm 20%", "hybrid, calibrated on WikiText-2 20%",
                                          "hybrid, calibrated on SMS 20%"}


def test_refit_task_gguf_llamacpp(data_dir, smollm2, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from calibrate import calibrate, evaluate_task, load_task
    from calibrate.tasks import task_calibration_corpus
    from pruning import PruneConfig, prune

    figures = run_notebook("4-refit-task-gguf-llamacpp", tmp_path, monkeypatch)
    model, tok = smollm2
    config = PruneConfig(ratio=0.2, method="hybrid", reconstruct="lstsq")  # the task model: a refit (the costly part)
    assert figures["refit"]["base"]["sms_spam"] == pytest.approx(ppl(model, tok, "sms_spam"), rel=1e-4)
    assert set(figures["refit"]) == {"base", "hybrid 20%, SMS, reconstruct=none", "hybrid 20%, SMS, reconstruct=lstsq"}
    task = load_task("sms_spam")
    prompts = calibrate(model, batches(tok, task_calibration_corpus(task), batch_size=4), second_moment=True,
                        holdout=0.125)
    task_model = prune(model, prompts, config).model
    result = evaluate_task(task_model, tok, task, size=CI["GLU_NB_TASK_SIZE"])
    assert figures["task"]["task prompts, +lstsq"]["balanced_accuracy"] == pytest.approx(result.balanced_accuracy)
    assert figures["task"]["task prompts, +lstsq"]["n"] == result.n == CI["GLU_NB_TASK_SIZE"]
    hf = ppl(task_model, tok, "sms_spam")
    assert figures["gguf"]["transformers_sms"] == pytest.approx(hf, rel=1e-4)
    assert figures["gguf"]["llama_cpp_sms"] == pytest.approx(hf, rel=5e-3)  # f16 weights and KV cache
    assert (tmp_path / "sms-task-20.f16.gguf").stat().st_size == figures["gguf"]["bytes"]
