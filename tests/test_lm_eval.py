import json

import pytest
import torch
from tiny import GRID_OPTIONS as OPTIONS
from tiny import tiny_model, tiny_tokenizer

from benchmarks.grid.compare import compare

pytest.importorskip("lm_eval")

CHOICES = [" blue", " green", " loud"]


def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log p(choice tokens | context), computed directly from the logits."""
    ctx = tokenizer(context)["input_ids"]
    ids = torch.tensor([ctx + tokenizer(choice)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(sum(logp[i - 1, ids[0, i]] for i in range(len(ctx), ids.shape[1])))


def write_task(folder, model, tokenizer, n=8) -> None:
    """A local multiple-choice task whose answer is the model's own best choice on even documents
    and a wrong one on odd documents: its accuracy must be exactly 0.5."""
    rows = []
    for i in range(n):
        question = f"Q{i}: the colour of the sky at noon is"
        best = max(range(3), key=lambda c: choice_logprob(model, tokenizer, question, CHOICES[c]))
        rows.append({"question": question, "choices": CHOICES, "answer": best if i % 2 == 0 else (best + 1) % 3})
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "tiny_sky.yaml").write_text(
        "task: tiny_sky\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def test_lm_eval_scores_join_the_grid(grid_setup, tmp_path):
    from benchmarks.deploy.lm_eval_tasks import lm_eval_scores
    from calibrate.errors import GluPruneError

    model_dir, corpora = grid_setup
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, tiny_model("llama"), tiny_tokenizer())
    assert lm_eval_scores(tiny_model("llama"), tiny_tokenizer(), ["tiny_sky"], include_path=str(tasks)) == {
        "tiny_sky/acc": 0.5}
    with pytest.raises(GluPruneError, match="no task 'nope'"):
        lm_eval_scores(tiny_model("llama"), tiny_tokenizer(), ["nope"], include_path=str(tasks))
    rows = compare(model_dir, corpora[:1], [0.5], ["ppm"], tmp_path / "g", lm_eval=["tiny_sky"],
                   lm_eval_include=str(tasks), **OPTIONS)
    assert {r["model"]: r["lm_eval:tiny_sky/acc"] for r in rows}["base"] == 0.5
    assert all(0 <= r["lm_eval:tiny_sky/acc"] <= 1 for r in rows)
    assert "### lm-evaluation-harness" in (tmp_path / "g" / "results.md").read_text()
    assert len(json.loads((tmp_path / "g" / "lm_eval.json").read_text())) == 2
