import json

import pytest

from calibrate.corpora import load_corpus, split_documents
from calibrate.errors import GluPruneError

ROW_COUNTS = [("wikitext2", "calibration", None, 3760), ("wikitext2", "evaluation", None, 4358),
              ("sms_spam", "calibration", None, 4460), ("sms_spam", "evaluation", None, 1114),
              ("sms_spam", None, "train", 5574), ("wikitext2", None, "test", 4358),
              ("wikitext2", None, "validation", 3760)]


@pytest.mark.parametrize("name,part,split,rows", ROW_COUNTS)
def test_named_parts_have_documented_row_counts(data_dir, name, part, split, rows):
    corpus = load_corpus(name, part=part, split=split, data_dir=data_dir)
    assert len(corpus.texts) == rows
    assert corpus.kind == ("documents" if name == "wikitext2" else "messages")


def test_rows_follow_the_hugging_face_mapping(data_dir):
    test = load_corpus("wikitext2", part="evaluation", data_dir=data_dir).texts
    assert test[0] == "" and test[1] == " = Robert Boulter = \n"
    sms = load_corpus("sms_spam", split="train", data_dir=data_dir).texts
    assert sms[0].startswith("Go until jurong point") and sms[0].endswith("\n")
    evaluation = load_corpus("sms_spam", part="evaluation", data_dir=data_dir).texts
    assert evaluation[0] == sms[4] and evaluation[1] == sms[9]


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("GLU_DATA_DIR", str(data_dir))
    assert len(load_corpus("sms_spam", part="calibration").texts) == 4460


def test_missing_file_in_data_dir_names_it(tmp_path, data_dir):
    with pytest.raises(GluPruneError, match="wiki.train.raw is missing"):
        load_corpus("wikitext2", split="train", data_dir=data_dir)
    with pytest.raises(GluPruneError, match="SMSSpamCollection is missing from"):
        load_corpus("sms_spam", data_dir=tmp_path)


def write_formats(tmp_path):
    docs = [f"document number {i} about pruning" for i in range(10)]
    (tmp_path / "c.txt").write_text("\n\n\n".join(docs) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    (tmp_path / "c.json").write_text(json.dumps([{"body": d} for d in docs]))
    (tmp_path / "c.csv").write_text("id,text\n" + "\n".join(f'{i},"{d}"' for i, d in enumerate(docs)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    return docs


@pytest.mark.parametrize("name,field", [("c.txt", None), ("folder", None), ("c.jsonl", None), ("c.json", "body"),
                                        ("c.csv", "text"), ("c.parquet", None)])
def test_custom_corpora_of_each_format(tmp_path, name, field):
    docs = write_formats(tmp_path)
    corpus = load_corpus(str(tmp_path / name), part="all", text_field=field)
    assert corpus.texts == docs and corpus.kind == "documents"
    evaluation = load_corpus(str(tmp_path / name), part="evaluation", text_field=field)
    calibration = load_corpus(str(tmp_path / name), part="calibration", text_field=field)
    assert evaluation.texts == [docs[4], docs[9]] and len(calibration.texts) == 8


def test_split_documents_on_blank_lines():
    assert split_documents("a\nb\n\n  \nc\n\n") == ["a\nb", "c"]


def one_line_error(call) -> str:
    with pytest.raises(GluPruneError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_corpora_give_one_line_errors(tmp_path, data_dir):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert "neither a built-in" in one_line_error(lambda: load_corpus(str(tmp_path / "nope.txt")))
    assert "neither a built-in" in one_line_error(lambda: load_corpus("./missing-folder"))
    assert "empty" in one_line_error(lambda: load_corpus(str(tmp_path / "empty.txt"), part="all"))
    assert "binary" in one_line_error(lambda: load_corpus(str(tmp_path / "binary.txt")))
    assert "UTF-8" in one_line_error(lambda: load_corpus(str(tmp_path / "latin.txt")))
    assert "--text-field" in one_line_error(lambda: load_corpus(str(tmp_path / "c.jsonl"), part="all"))
    assert "text_field='txt'" in one_line_error(
        lambda: load_corpus(str(tmp_path / "c.jsonl"), part="all", text_field="txt"))
    assert "choose one of" in one_line_error(lambda: load_corpus("wikitext2", part="train", data_dir=data_dir))
    assert "no split" in one_line_error(lambda: load_corpus("sms_spam", split="test", data_dir=data_dir))
    assert "not both" in one_line_error(lambda: load_corpus("sms_spam", part="evaluation", split="train"))
    assert "does not exist" in one_line_error(lambda: load_corpus("sms_spam", data_dir=tmp_path / "none"))
    (tmp_path / "one.txt").write_text("only one document")
    assert "too few" in one_line_error(lambda: load_corpus(str(tmp_path / "one.txt"), part="evaluation"))


def test_hub_failure_suggests_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("GLU_DATA_DIR", raising=False)
    assert "--data-dir" in one_line_error(lambda: load_corpus("wikitext2"))
    assert "--text-field" in one_line_error(lambda: load_corpus("someone/dataset"))
    assert "could not load hub dataset" in one_line_error(lambda: load_corpus("someone/dataset", text_field="t"))


def test_the_python_api_defaults_to_the_calibration_part(data_dir):
    """load_corpus(name) never hands out the evaluation part unasked."""
    default = load_corpus("wikitext2", data_dir=data_dir)
    assert default.part == "calibration"
    assert default.texts == load_corpus("wikitext2", part="calibration", data_dir=data_dir).texts
    assert default.texts != load_corpus("wikitext2", part="evaluation", data_dir=data_dir).texts
