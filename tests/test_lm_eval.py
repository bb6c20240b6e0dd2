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


THINGS = ["sky", "sea", "grass", "fire", "snow", "night", "leaf", "rose"]
PEAKED = dict(initializer_range=0.3)  # weights that make the model's choices depend on the question and the prune


def best_choice(model, tokenizer, question: str) -> int:
    return max(range(3), key=lambda c: choice_logprob(model, tokenizer, question, CHOICES[c]))


def write_task(folder, model, tokenizer) -> list[dict]:
    """A local multiple-choice task whose answer is the model's own best choice on even documents
    and a wrong one on odd documents: its accuracy must be exactly 0.5. The choices carry their
    leading space, so the harness's delimiter is empty: it scores exactly what choice_logprob does."""
    rows = []
    for i, thing in enumerate(THINGS):
        question = f"Q{i}: the colour of the {thing} is"
        best = best_choice(model, tokenizer, question)
        rows.append({"question": question, "choices": CHOICES, "answer": best if i % 2 == 0 else (best + 2) % 3})
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "tiny_sky.yaml").write_text(
        "task: tiny_sky\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return rows


def test_lm_eval_scores_join_the_grid(tmp_path):
    from tiny import grid_workspace

    from benchmarks.deploy.lm_eval_tasks import lm_eval_scores
    from calibrate.errors import GluPruneError
    from pruning import PruneConfig, prune

    model_dir, corpora = grid_workspace(tmp_path, **PEAKED)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = write_task(tasks, tiny_model("llama", **PEAKED), tiny_tokenizer())
    assert lm_eval_scores(tiny_model("llama", **PEAKED), tiny_tokenizer(), ["tiny_sky"], include_path=str(tasks)) == {
        "tiny_sky/acc": 0.5}
    with pytest.raises(GluPruneError, match="no task 'nope'"):
        lm_eval_scores(tiny_model("llama", **PEAKED), tiny_tokenizer(), ["nope"], include_path=str(tasks))
    grid = compare(model_dir, corpora[:1], [0.5], ["ppm"], tmp_path / "g", lm_eval=["tiny_sky"],
                   lm_eval_include=str(tasks), **OPTIONS)
    # the pruned cell's expected accuracy, counted directly: ppm is data-free and uniform, so the grid's
    # "ppm-0.5-static" model is this prune of the base; it disagrees with the base on some questions
    pruned = prune(tiny_model("llama", **PEAKED), None, PruneConfig(ratio=0.5, method="ppm")).model
    expected = sum(best_choice(pruned, tiny_tokenizer(), r["question"]) == r["answer"] for r in rows) / len(rows)
    assert expected != 0.5
    assert {r["model"]: r["lm_eval:tiny_sky/acc"] for r in grid} == {"base": 0.5, "ppm-0.5-static": expected}
    assert "### lm-evaluation-harness" in (tmp_path / "g" / "results.md").read_text()
    assert len(json.loads((tmp_path / "g" / "lm_eval.json").read_text())) == 2
