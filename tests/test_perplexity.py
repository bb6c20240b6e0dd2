import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer

from calibrate.batches import make_batches
from calibrate.corpora import Corpus
from calibrate.errors import GluPruneError
from calibrate.perplexity import document_windows, message_sequences, perplexity

TEXTS = ["The quick brown fox jumps over the lazy dog.", "", "Pack my box with five dozen liquor jugs!"]
MESSAGES = ["hi there\n", "call me now\n", "ok\n", "see you at 5 pm, don't be late\n"]


def hand_nll(model, sequences):
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            logp = F.log_softmax(model(x).logits[0].double(), dim=-1)
            for t in range(1, len(ids)):
                total -= logp[t - 1, ids[t]].item()
                count += 1
    return total, count


def test_document_perplexity_equals_hand_computed_nll():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = Corpus("docs", "documents", TEXTS, "memory", "all")
    result = perplexity(model, tok, corpus, seq_len=16, max_tokens=70)
    ids = tok("\n\n".join(TEXTS))["input_ids"][:70]
    windows = [ids[i : i + 16] for i in range(0, 70, 16)]
    assert [len(w) for w in windows] == [16, 16, 16, 16, 6]
    total, count = hand_nll(model, windows)
    assert result.tokens == count == 70 - 5
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)


def test_message_perplexity_prepends_bos_and_predicts_every_message_token():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    corpus = Corpus("msgs", "messages", MESSAGES, "memory", "all")
    result = perplexity(model, tok, corpus, max_docs=3)
    sequences = [[tok.bos_token_id] + tok(m.rstrip("\n"))["input_ids"] for m in MESSAGES[:3]]
    total, count = hand_nll(model, sequences)
    assert result.tokens == count == sum(len(m.rstrip("\n")) for m in MESSAGES[:3])
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)


@pytest.mark.parametrize("kind,texts", [("documents", TEXTS), ("messages", MESSAGES)])
def test_batched_perplexity_equals_batch_size_one(kind, texts):
    model, tok = tiny_model("gemma2"), tiny_tokenizer()
    corpus = Corpus("c", kind, texts, "memory", "all")
    one = perplexity(model, tok, corpus, seq_len=24)
    four = perplexity(model, tok, corpus, seq_len=24, batch_size=4)
    assert one.tokens == four.tokens
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_window_and_message_rules():
    tok = tiny_tokenizer()
    ids = tok("\n\n".join(["abcdefg"]))["input_ids"]
    assert document_windows(tok, ["abcdefg"], 3, None) == [ids[0:3], ids[3:6]]  # last window of 1 dropped
    seqs = message_sequences(tok, ["a", "", "bc"], max_docs=None, max_tokens=None)
    assert seqs == [[1, *tok("a")["input_ids"]], [1, *tok("bc")["input_ids"]]]


def test_bad_arguments_are_one_line_errors():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = Corpus("c", "documents", ["a"], "memory", "all")
    with pytest.raises(GluPruneError):
        perplexity(model, tok, corpus)  # a single token predicts nothing
    with pytest.raises(GluPruneError):
        perplexity(model, tok, Corpus("c", "documents", TEXTS, "m", "all"), seq_len=1)


def test_make_batches_packs_documents_and_pads_messages():
    tok = tiny_tokenizer()
    docs = make_batches(tok, Corpus("d", "documents", TEXTS, "m", "all"), seq_len=8, max_tokens=32, batch_size=3)
    assert [b["input_ids"].shape for b in docs] == [(3, 8), (1, 8)]
    assert all(b["attention_mask"].all() for b in docs)
    msgs = make_batches(tok, Corpus("m", "messages", MESSAGES, "m", "all"), seq_len=64, max_tokens=None,
                        batch_size=2)
    first = msgs[0]
    assert first["input_ids"][0, 0].item() == tok.bos_token_id
    assert first["attention_mask"].sum(1).tolist() == [len("hi there") + 1, len("call me now") + 1]
    with pytest.raises(GluPruneError):
        make_batches(tok, Corpus("d", "documents", ["ab"], "m", "all"), seq_len=8)
