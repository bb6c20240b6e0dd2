"""Prompt templates: what each renders, that no evaluated message is ever a shot or calibration text,
that a score under a template is the plain count, the multi-template report and its CLI."""

import json

import numpy as np
import pytest
from test_tasks import plain_label_logprob, write_csv
from tiny import save_tiny, tiny_model, tiny_tokenizer

from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.prompts import SMS_FORMAT, fixed_shots
from calibrate.stats import ActivationStats
from calibrate.tasks import balanced_subset, evaluate_task, load_task
from calibrate.template_eval import evaluate_templates, templates_task_corpus
from calibrate.templates import (
    GENERIC_CALIBRATION,
    GENERIC_EVALUATION,
    SHOT_CHOICES,
    SMS_CALIBRATION,
    SMS_EVALUATION,
    PromptTemplate,
    half_raw,
    ordered,
    pick_templates,
    tables,
)
from glu_prune_cli.main import main


def csv_task(tmp_path):
    return load_task(str(write_csv(tmp_path / "t.csv")), text_field="body", label_field="tag")


def test_default_is_the_evaluators_own_prompt_and_the_tables_are_disjoint():
    default = SMS_EVALUATION[0]
    assert default.name == "default" and default.format(("ham", "spam")) == SMS_FORMAT
    assert (default.shots, default.seed, default.order, default.reference) == (4, 0, "shuffled", "N/A")
    for evaluation, calibration in (SMS_EVALUATION, SMS_CALIBRATION), (GENERIC_EVALUATION, GENERIC_CALIBRATION):
        assert len(evaluation) >= 5 and len(calibration) >= 4
        layouts = {(t.instruction, t.example) for t in evaluation}
        assert not layouts & {(t.instruction, t.example) for t in calibration}
        assert not {t.name for t in evaluation} & {t.name for t in calibration}
        unseen = evaluation[1:]
        assert {t.reference is None for t in unseen} == {True, False}  # with and without the reference query
        assert all((t.shots, t.seed) != (evaluation[0].shots, evaluation[0].seed) for t in unseen)  # other shots
    words = {tuple(t.words(("ham", "spam")).values()) for t in SMS_EVALUATION}
    assert {(" ham", " spam"), (" no", " yes"), (" normal", " junk")} <= words
    assert tables("sms_spam") == (SMS_EVALUATION, SMS_CALIBRATION)
    assert tables("my-task") == (GENERIC_EVALUATION, GENERIC_CALIBRATION)


def test_a_template_renders_its_label_words_shot_count_and_order(tmp_path):
    task = csv_task(tmp_path)
    labels = task.calibration.labels
    template = PromptTemplate("t", "Sort ({labels}).", "<{text}> is", {"a": " first", "b": " second"}, shots=6, seed=5,
                              order="grouped-reversed", reference=None)
    fmt = template.format(task.labels)
    assert fmt.instruction == "Sort (a, b)." and fmt.label_words == {"a": " first", "b": " second"}
    shots = template.shot_indices(labels, task.labels)
    assert [labels[i] for i in shots] == ["b"] * 3 + ["a"] * 3  # grouped, last label first
    assert sorted(shots) == sorted(PromptTemplate("u", "", "{text}", " {label}", shots=6, seed=5).shot_indices(
        labels, task.labels))  # the order changes, not the shots drawn
    assert [labels[i] for i in ordered(shots, labels, task.labels, "grouped")] == ["a"] * 3 + ["b"] * 3
    pairs = [(task.calibration.texts[i], labels[i]) for i in shots]
    prompt = fmt.prompt(pairs, "new text")
    assert prompt.split("\n\n")[0] == "Sort (a, b)." and prompt.endswith("<new text> is")
    assert prompt.count(" second") == 3 and prompt.count(" first") == 3
    assert PromptTemplate("p", "", "{text}", " <{label}>").words(("x", "y")) == {"x": " <x>", "y": " <y>"}
    with pytest.raises(GluPruneError, match="no word for label 'a'"):
        SMS_EVALUATION[1].format(task.labels)
    with pytest.raises(GluPruneError, match="shot order 'sideways'"):
        ordered(shots, labels, task.labels, "sideways")


@pytest.mark.parametrize("name", ["answer", "quoted"])
def test_a_score_under_a_template_is_the_plain_count(tmp_path, name):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    task = csv_task(tmp_path)
    template = pick_templates(task.name, name)[0]
    result = evaluate_task(model, tokenizer, task, seed=2, batch_size=3, template=template)
    fmt = template.format(task.labels)
    shots = [(task.calibration.texts[i], task.calibration.labels[i]) for i in result.shot_indices]
    assert result.shot_indices == template.shot_indices(task.calibration.labels, task.labels)
    chosen = balanced_subset(task.evaluation.labels, task.labels, None, 2, task.name)
    expected = np.array([[plain_label_logprob(model, tokenizer, fmt.prompt(shots, task.evaluation.texts[i]),
                                              fmt.label_words[k]) for k in task.labels] for i in chosen])
    np.testing.assert_allclose(np.array(result.scores), expected, rtol=1e-5, atol=1e-5)
    offset = np.zeros(2) if template.reference is None else np.array(
        [plain_label_logprob(model, tokenizer, fmt.prompt(shots, template.reference), fmt.label_words[k])
         for k in task.labels])
    truth = np.array([task.labels.index(task.evaluation.labels[i]) for i in chosen])
    choice = (expected - offset).argmax(axis=1)
    recall = [float((choice[truth == j] == j).mean()) for j in range(2)]
    assert result.balanced_accuracy == pytest.approx(np.mean(recall))
    assert result.reference == template.reference and result.template == name and result.shots == template.shots
    assert result.prompt == fmt.prompt(shots, "{text}")


def test_the_report_has_one_result_per_template_on_the_same_messages_and_their_spread(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    task = csv_task(tmp_path)
    report = evaluate_templates(model, tokenizer, task, pick_templates(task.name, "all"))
    assert [r.template for r in report.results] == [t.name for t in GENERIC_EVALUATION]
    plain = evaluate_task(model, tokenizer, task)  # default equals the evaluator without a template
    assert report.results[0].scores == plain.scores and report.results[0].balanced_accuracy == plain.balanced_accuracy
    assert len({tuple(r.truth) for r in report.results}) == 1  # every template sees the same messages
    values = [r.balanced_accuracy for r in report.results]
    assert report.spread("balanced_accuracy") == (min(values), max(values))
    assert report.spread("auc") == (min(r.auc for r in report.results), max(r.auc for r in report.results))
    out = report.to_dict()
    assert len(out["templates"]) == 5 and out["spread"]["auc"] == report.spread("auc")
    assert [t.name for t in pick_templates(task.name, "unseen")] == [t.name for t in GENERIC_EVALUATION[1:]]
    assert [t.name for t in pick_templates("sms_spam", "answer, junk")] == ["answer", "junk"]


def test_templates_through_the_cli_one_row_each_and_json(tmp_path, capsys):
    save_tiny(tmp_path / "m")
    path = write_csv(tmp_path / "t.csv")
    flags = ["eval", "--model", str(tmp_path / "m"), "--task", str(path), "--text-field", "body", "--label-field",
             "tag", "--templates", "all"]
    assert main(flags) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[2:7]] == [t.name for t in GENERIC_EVALUATION]
    assert lines[7].startswith("balanced accuracy: min") and lines[8].startswith("auc: min")
    assert main([*flags, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = evaluate_templates(tiny_model("llama"), tiny_tokenizer(), csv_task(tmp_path),
                                pick_templates("t", "all"))
    assert [r["balanced_accuracy"] for r in printed["templates"]] == [r.balanced_accuracy for r in direct.results]
    assert printed["spread"]["balanced_accuracy"] == list(direct.spread("balanced_accuracy"))


def test_a_bad_template_name_is_one_line():
    for names in ("fancy", "default,fancy", " , "):
        with pytest.raises(GluPruneError) as info:
            pick_templates("sms_spam", names)
        assert "unknown template" in str(info.value) and "\n" not in str(info.value)
        assert "yes-no" in str(info.value)


def split_pieces(documents: list[str]) -> set[str]:
    return {piece for d in documents for piece in d.split("\n\n")}


def test_no_evaluation_message_in_any_templates_shots_or_calibration_text(data_dir):
    task = load_task("sms_spam", data_dir=data_dir)
    evaluated, calibration = set(task.evaluation.texts), set(task.calibration.texts)
    for template in SMS_EVALUATION:
        shots = template.shot_indices(task.calibration.labels, task.labels)
        assert len(shots) == template.shots and not evaluated & {task.calibration.texts[i] for i in shots}
    assert SMS_EVALUATION[0].shot_indices(task.calibration.labels, task.labels) == fixed_shots(
        task.calibration.labels, list(task.labels), 4, 0)
    corpus = load_corpus("sms_spam:templates", data_dir=data_dir)
    assert corpus.texts == templates_task_corpus(task).texts
    assert len(corpus.texts) == len(task.calibration.texts)
    documents = corpus.texts[:600]
    pieces = split_pieces(documents)
    for template in SMS_CALIBRATION + SMS_EVALUATION:
        fmt = template.format(task.labels)
        rendered = {fmt.example(text, label) for text, label in zip(task.evaluation.texts, task.evaluation.labels)}
        assert not rendered & pieces  # no evaluated message, in any layout
    for i, document in enumerate(documents):
        template = SMS_CALIBRATION[i % len(SMS_CALIBRATION)]
        fmt = template.format(task.labels)
        parts = document.split("\n\n")
        own = fmt.example(task.calibration.texts[i], task.calibration.labels[i])
        assert parts[0] == fmt.instruction and own in parts
        shots = parts[1 : parts.index(own)]
        assert len(shots) in SHOT_CHOICES and own not in shots
        truth = {fmt.example(t, label) for t, label in zip(task.calibration.texts, task.calibration.labels)}
        assert all(s in truth for s in shots)
        assert parts[-1] == (fmt.example(template.reference) if template.reference is not None else own)
    mix = load_corpus("sms_spam:templates-mix", data_dir=data_dir).texts
    assert mix[0::2] == corpus.texts[: len(mix) // 2]
    assert all(line in calibration for block in mix[1::2] for line in block.split("\n"))
    with pytest.raises(GluPruneError, match="calibration text only"):
        load_corpus("sms_spam:templates", part="evaluation", data_dir=data_dir)


def test_half_raw_follows_each_document_with_at_least_as_much_raw_text():
    assert half_raw(["ab", "cd", "ef"], ["xxxx", "y", "zzzzzzzz"]) == ["xxxx", "ab\ncd", "y", "ef"]


def test_calibrate_with_task_text_uses_the_calibration_templates(tmp_path):
    save_tiny(tmp_path / "m")
    path = write_csv(tmp_path / "t.csv")
    task = csv_task(tmp_path)
    flags = ["calibrate", "--model", str(tmp_path / "m"), "--task", str(path), "--text-field", "body", "--label-field",
             "tag", "--seq-len", "32", "--max-tokens", "256", "--device", "cpu"]
    for text in ("templates", "templates-mix"):
        assert main([*flags, "--task-text", text, "--out", str(tmp_path / f"{text}.st")]) == 0
        assert ActivationStats.load(tmp_path / f"{text}.st").meta["corpus"] == f"t:{text}"
        documents = templates_task_corpus(task, text).texts
        assert documents[0].startswith(GENERIC_CALIBRATION[0].format(task.labels).instruction)
        assert not split_pieces(documents) & {GENERIC_EVALUATION[k].format(task.labels).example(t, label)
                                              for k in range(5)
                                              for t, label in zip(task.evaluation.texts, task.evaluation.labels)}
