"""Labelled tasks: the few-shot choice against a plain forward pass, the metrics, the split
guarantees of the shots and of the task-formatted corpora, the CLI and the grid."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from tiny import GRID_OPTIONS, save_tiny, tiny_model, tiny_tokenizer

from benchmarks.grid.compare import compare
from calibrate.batches import make_batches, with_bos
from calibrate.corpora import labelled_part, load_corpus
from calibrate.errors import GluPruneError
from calibrate.prompts import DEFAULT_REFERENCE, SMS_FORMAT, fixed_shots, mix_documents
from calibrate.run import calibrate
from calibrate.stats import ActivationStats
from calibrate.task_metrics import auc, bootstrap_intervals
from calibrate.tasks import balanced_subset, evaluate_task, load_task, task_calibration_corpus
from glu_prune_cli.main import main
from pruning import PruneConfig, prune

WORDS = {"a": "apple pear plum fig", "b": "brick stone slab tile"}


def write_csv(path, n=60, text="body", label="tag", split=False):
    """A two-label CSV task: rows in blocks of 5 labelled a, a, a, b, b, a, a, a, b, b, ... (60 rows:
    8 a and 4 b in the evaluation part), each text its index and three of its label's words."""
    rng = random.Random(1)
    with open(path, "w", newline="") as f:
        fields = [text, label] + (["split"] if split else [])
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i in range(n):
            tag = "a" if (i // 5) % 5 in (0, 1, 2) else "b"
            row = {text: f"{i} " + " ".join(rng.sample(WORDS[tag].split(), 3)), label: tag}
            if split:
                row["split"] = "test" if i % 3 == 0 else "train"
            writer.writerow(row)
    return path


def plain_label_logprob(model, tokenizer, prompt: str, word: str) -> float:
    """sum log p(word tokens | BOS + prompt), one unbatched, unpadded forward pass of the whole sequence."""
    context = with_bos(tokenizer, tokenizer(prompt)["input_ids"])
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + word_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(context) - 1 + k, token].item() for k, token in enumerate(word_ids))


@pytest.mark.parametrize("prefix_cache,batch_size", [(True, 3), (False, 5)])
def test_few_shot_choice_matches_a_plain_forward_pass(tmp_path, prefix_cache, batch_size):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    task = load_task(str(write_csv(tmp_path / "t.csv")), text_field="body", label_field="tag")
    result = evaluate_task(model, tokenizer, task, shots=3, seed=2, batch_size=batch_size, prefix_cache=prefix_cache)
    shots = [(task.calibration.texts[i], task.calibration.labels[i]) for i in result.shot_indices]
    chosen = balanced_subset(task.evaluation.labels, task.labels, None, 2, task.name)
    expected = np.array([[plain_label_logprob(model, tokenizer, task.format.prompt(shots, task.evaluation.texts[i]),
                                              task.format.label_words[label]) for label in task.labels]
                         for i in chosen])
    np.testing.assert_allclose(np.array(result.scores), expected, rtol=1e-5, atol=1e-5)
    reference = [plain_label_logprob(model, tokenizer, task.format.prompt(shots, "N/A"), task.format.label_words[k])
                 for k in task.labels]
    np.testing.assert_allclose(list(result.reference_scores.values()), reference, rtol=1e-5, atol=1e-5)
    assert (result.prefix_tokens > 0) == prefix_cache
    truth = np.array([task.labels.index(task.evaluation.labels[i]) for i in chosen])
    for choice, recall in ((expected - reference).argmax(axis=1), result.recall), \
            (expected.argmax(axis=1), result.plain_recall):
        assert recall == {k: float((choice[truth == j] == j).mean()) for j, k in enumerate(task.labels)}
    assert result.balanced_accuracy == pytest.approx(np.mean(list(result.recall.values())))
    margin = expected[:, 1] - expected[:, 0]
    pairs = [(p > q) + 0.5 * (p == q) for p in margin[truth == 1] for q in margin[truth == 0]]
    assert result.auc == pytest.approx(np.mean(pairs), abs=1e-9)
    assert result.n == 2 * min(task.evaluation.labels.count("a"), task.evaluation.labels.count("b"))
    assert result.per_label == {"a": result.n // 2, "b": result.n // 2}
    assert len(result.shot_indices) == 3 and "{text}" in result.prompt


def test_auc_counts_ties_half_and_the_bootstrap_is_fixed_by_its_seed():
    pos, neg = np.array([3.0, 1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auc(pos, neg) == pytest.approx(brute)
    truth = np.array([0] * 30 + [1] * 30)
    predicted = np.array([0] * 20 + [1] * 10 + [1] * 25 + [0] * 5)
    margin = np.linspace(-1, 1, 60)
    one = bootstrap_intervals(truth, predicted, margin, 2, seed=0)
    assert one == bootstrap_intervals(truth, predicted, margin, 2, seed=0)
    assert one != bootstrap_intervals(truth, predicted, margin, 2, seed=1)
    low, high = one["balanced_accuracy"]
    assert low < (20 / 30 + 25 / 30) / 2 < high and 0 < low and high < 1


def test_shots_are_balanced_seeded_and_never_the_evaluated_examples(tmp_path):
    task = load_task(str(write_csv(tmp_path / "t.csv")), text_field="body", label_field="tag")
    shots = fixed_shots(task.calibration.labels, list(task.labels), 4, seed=0)
    assert sorted(task.calibration.labels[i] for i in shots) == ["a", "a", "b", "b"]
    assert shots == fixed_shots(task.calibration.labels, list(task.labels), 4, seed=0)
    assert shots != fixed_shots(task.calibration.labels, list(task.labels), 4, seed=1)
    evaluated = set(task.evaluation.texts)
    assert not evaluated & {task.calibration.texts[i] for i in shots}
    assert all(int(t.split()[0]) % 5 == 4 for t in task.evaluation.texts)  # the fixed hold-out by index


def test_a_split_field_decides_the_parts(tmp_path):
    task = load_task(str(write_csv(tmp_path / "t.csv", split=True)), text_field="body", label_field="tag")
    assert [int(t.split()[0]) for t in task.evaluation.texts] == list(range(0, 60, 3))
    assert len(task.calibration.texts) == 40


def parse(document: str) -> list[tuple[str, str]]:
    """(message, label) of every example of a task-formatted sms_spam document."""
    examples = document.split("\n\n")
    assert examples[0] == SMS_FORMAT.instruction
    out = []
    for example in examples[1:]:
        head, _, label = example.rpartition("\nLabel: ")
        assert head.startswith("Message: ")
        out.append((head.removeprefix("Message: "), label))
    return out


def test_no_evaluation_text_in_shots_or_in_task_formatted_calibration_text(data_dir):
    task = load_task("sms_spam", data_dir=data_dir)
    raw = load_corpus("sms_spam", part="calibration", data_dir=data_dir)
    assert task.calibration.texts == [t.rstrip("\r\n") for t in raw.texts]  # the corpus's split, by index
    evaluated = set(task.evaluation.texts)
    assert task.repeats == 120 and len(task.evaluation.texts) == 1114 - 120
    assert not evaluated & set(task.calibration.texts)
    assert balanced_subset(task.evaluation.labels, task.labels, None, 0, "sms_spam").__len__() == 260
    result_shots = fixed_shots(task.calibration.labels, list(task.labels), 4, 0)
    assert not evaluated & {task.calibration.texts[i] for i in result_shots}
    calibration = set(task.calibration.texts)
    truth = dict(zip(*labelled_part("sms_spam", "calibration", data_dir)[:2]))
    formatted = load_corpus("sms_spam:task", part="calibration", data_dir=data_dir)
    assert formatted.kind == "documents" and len(formatted.texts) == len(task.calibration.texts)
    for i, document in enumerate(formatted.texts[:400]):
        examples = parse(document)
        assert len(examples) == 5 and examples[-1] == (task.calibration.texts[i], task.calibration.labels[i])
        assert all(text in calibration and truth[text] == label for text, label in examples)
        assert examples[-1] not in examples[:-1]  # a message is never its own shot
    held_out = load_corpus("sms_spam:task", part="evaluation", data_dir=data_dir)
    for document in held_out.texts[:200]:
        assert all(text in calibration for text, _ in parse(document)[:-1])  # shots only from calibration
    mix = load_corpus("sms_spam:mix", part="calibration", data_dir=data_dir)
    task_chars = sum(len(d) for d in mix.texts[0::2])
    raw_chars = sum(len(d) for d in mix.texts[1::2])
    assert abs(task_chars - raw_chars) / task_chars < 0.02
    assert all(line in calibration for d in mix.texts[1::2] for line in d.split("\n"))
    assert "fixed parts" in str(pytest.raises(GluPruneError, load_corpus, "sms_spam:task", part="all",
                                              data_dir=data_dir).value)


def test_ref_forms_end_every_prompt_with_the_content_free_query_the_choice_subtracts(data_dir):
    task = load_task("sms_spam", data_dir=data_dir)
    query = SMS_FORMAT.separator + SMS_FORMAT.example(DEFAULT_REFERENCE)
    assert query == "\n\nMessage: N/A\nLabel:"
    for part in ("calibration", "evaluation"):
        plain = load_corpus("sms_spam:task", part=part, data_dir=data_dir).texts
        with_query = load_corpus("sms_spam:task-ref", part=part, data_dir=data_dir).texts
        assert with_query == [d + query for d in plain]
    mix = load_corpus("sms_spam:mix-ref", part="calibration", data_dir=data_dir).texts
    formatted = load_corpus("sms_spam:task-ref", part="calibration", data_dir=data_dir).texts
    assert mix[0::2] == formatted[: len(mix[0::2])]
    calibration = set(task.calibration.texts)
    assert all(line in calibration for d in mix[1::2] for line in d.split("\n"))


def test_a_task_calibration_corpus_is_the_ref_form_for_sms_spam(data_dir):
    corpus = task_calibration_corpus(load_task("sms_spam", data_dir=data_dir))
    assert corpus.name == "sms_spam:task-ref" and corpus.kind == "documents"
    assert corpus.texts == load_corpus("sms_spam:task-ref", part="calibration", data_dir=data_dir).texts


def test_calibrate_and_prune_with_task_use_the_task_prompts(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    path = write_csv(tmp_path / "t.csv")
    task = load_task(str(path), text_field="body", label_field="tag")
    corpus = task_calibration_corpus(task)
    assert len(corpus.texts) == len(task.calibration.texts)
    assert all(d.endswith("\nText: N/A\nLabel:") for d in corpus.texts)
    flags = ["--task", str(path), "--text-field", "body", "--label-field", "tag", "--seq-len", "32", "--max-tokens",
             "512", "--device", "cpu"]  # the direct calibration below runs on the CPU
    assert main(["calibrate", "--model", str(tmp_path / "m"), *flags, "--out", str(tmp_path / "s.st")]) == 0
    stats = ActivationStats.load(tmp_path / "s.st")
    assert stats.meta["corpus"] == "t:task-ref"
    direct = calibrate(tiny_model("llama"), list(make_batches(tiny_tokenizer(), corpus, seq_len=32, max_tokens=512)))
    for i, layer in direct.layers.items():
        torch.testing.assert_close(stats.layers[i].sq_sum, layer.sq_sum)
    assert main(["prune", "--model", str(tmp_path / "m"), *flags, "--ratio", "0.25", "--out", str(tmp_path / "p")]) == 0
    manifest = json.loads((tmp_path / "p" / "config.json").read_text())["glu_prune"]
    assert "t:task-ref" in json.dumps(manifest)


def test_mix_alternates_formatted_documents_and_raw_blocks_of_the_same_length():
    mixed = mix_documents(["ab", "cd", "ef", "gh"], ["xxxxx", "yy", "zzzzzzzzzz"])
    assert mixed == ["xxxxx", "ab\ncd", "yy", "ef"]  # the third would need more raw text than is left


def test_custom_csv_task_end_to_end_through_the_cli(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    path = write_csv(tmp_path / "t.csv")
    code = main(["eval", "--model", str(tmp_path / "m"), "--task", str(path), "--text-field", "body",
                 "--label-field", "tag", "--shots", "2", "--seed", "3", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    direct = evaluate_task(tiny_model("llama"), tiny_tokenizer(), load_task(str(path), text_field="body",
                                                                            label_field="tag"), shots=2, seed=3)
    assert printed["n"] == direct.n == 8 and printed["shots"] == 2
    assert printed["balanced_accuracy"] == pytest.approx(direct.balanced_accuracy)
    assert printed["auc"] == pytest.approx(direct.auc)
    code = main(["eval", "--model", str(tmp_path / "m"), "--task", str(path), "--text-field", "body",
                 "--label-field", "tag", "--task-size", "4"])
    assert code == 0 and "(4 evaluation examples, 4 shots): balanced accuracy" in capsys.readouterr().out


def test_task_input_errors_are_one_line(tmp_path):
    path = write_csv(tmp_path / "t.csv")
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"m {i}", "label": "ham"}) for i in range(10)))
    cases = [
        (lambda: load_task(str(path), text_field="body"), "no 'label' field"),
        (lambda: load_task(str(path), text_field="body", label_field="kind"), "label_field='kind'"),
        (lambda: load_task(str(one)), "has one label"),
        (lambda: load_task(str(tmp_path / "missing.csv")), "neither a built-in task"),
        (lambda: evaluate_task(tiny_model(), tiny_tokenizer(), load_task(str(path), text_field="body",
                                                                         label_field="tag"), shots=40), "fewer than"),
        (lambda: evaluate_task(tiny_model(), tiny_tokenizer(), load_task(str(path), text_field="body",
                                                                         label_field="tag"), size=100), "at most 8"),
    ]
    for call, expected in cases:
        with pytest.raises(GluPruneError) as info:
            call()
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_grid_scores_tasks_beside_perplexity_and_resumes_by_settings(tmp_path):
    from tiny import grid_workspace

    peaked = dict(initializer_range=0.3)  # weights whose task scores the prune below changes
    model_dir, corpora = grid_workspace(tmp_path, **peaked)
    path = str(write_csv(tmp_path / "t.csv", text="text", label="label"))
    rows = compare(model_dir, corpora[:1], [0.5], ["ppm"], tmp_path / "g", tasks=[path], task_shots=2,
                   **GRID_OPTIONS)
    # the expected figures: the evaluator run directly on the base and on the same prune of it (ppm is
    # data-free, uniform: the grid's "ppm-0.5-static" cell)
    pruned = prune(tiny_model("llama", **peaked), None, PruneConfig(ratio=0.5, method="ppm")).model
    direct = {name: evaluate_task(model, tiny_tokenizer(), load_task(path), shots=2)
              for name, model in (("base", tiny_model("llama", **peaked)), ("ppm-0.5-static", pruned))}
    # so a cell scored on the wrong model fails (measured: balanced accuracy 0.875 against 0.625)
    assert direct["base"].balanced_accuracy != direct["ppm-0.5-static"].balanced_accuracy
    figures = {r["model"]: (r["task:t/balanced_accuracy"], r["task:t/auc"]) for r in rows}
    assert figures == {name: (pytest.approx(d.balanced_accuracy, abs=1e-9), pytest.approx(d.auc, abs=1e-9))
                       for name, d in direct.items()}
    assert "### Labelled tasks" in (tmp_path / "g" / "results.md").read_text()
    assert (tmp_path / "g" / "tasks.png").is_file()
    assert len(json.loads((tmp_path / "g" / "tasks.json").read_text())) == 2
    again = compare(model_dir, corpora[:1], [0.5], ["ppm"], tmp_path / "g", tasks=[path], task_shots=2, **GRID_OPTIONS)
    assert [r["task:t/balanced_accuracy"] for r in again] == [r["task:t/balanced_accuracy"] for r in rows]
    with pytest.raises(GluPruneError, match="tasks.t.shots 2 -> 4"):
        compare(model_dir, corpora[:1], [0.5], ["ppm"], tmp_path / "g", tasks=[path], task_shots=4, **GRID_OPTIONS)


@pytest.mark.slow
def test_smollm2_labels_sms_spam_above_chance(smollm2, data_dir):
    model, tokenizer = smollm2
    result = evaluate_task(model, tokenizer, load_task("sms_spam", data_dir=data_dir), size=40)
    assert result.n == 40 and result.per_label == {"ham": 20, "spam": 20}
    # docs/tasks.md ("On 40 of these messages"): balanced accuracy 0.900, AUC 0.9475, recall
    # 0.85 / 0.95, measured with these settings (4 shots, seed 0, float32, CPU). The figures are counts
    # (steps of 1/40 for a recall, 1/400 for the AUC), so a tolerance below a step: one message or one
    # spam/ham pair ranked otherwise fails
    assert result.balanced_accuracy == pytest.approx(0.900, abs=1e-6) and result.auc == pytest.approx(0.9475, abs=1e-6)
    assert result.recall == {"ham": pytest.approx(0.85, abs=1e-6), "spam": pytest.approx(0.95, abs=1e-6)}
    # and the 260-message figures of docs/tasks.md (0.900, AUC 0.957) lie in these 40 messages' intervals
    assert result.balanced_accuracy_ci[0] <= 0.900 <= result.balanced_accuracy_ci[1]
    assert result.auc_ci[0] <= 0.957 <= result.auc_ci[1]
