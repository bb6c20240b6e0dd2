"""Tokenizer metadata of a GGUF file: copied from the GGUF a model came from, else built from its
Hugging Face tokenizer the way llama.cpp's converter lays it out (token list, types, scores or
merges, special ids, chat template)."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import gguf

from calibrate.errors import GluPruneError

log = logging.getLogger("glu_prune")

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp's name for a byte-level BPE pre-tokenizer, told apart by the regex its tokenizer.json splits with
PRE_TOKENIZERS = [  # (pattern fragment, llama.cpp name); the first fragment found wins
    (r"\p{N}{1,3}", "llama-bpe"),
    (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|", "qwen2"),
]


def read_gguf_tokenizer(path: Path) -> dict[str, tuple]:
    """Every ``tokenizer.*`` field of the GGUF file ``path``: key -> (value, type, array item type)."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise GluPruneError(f"{path} could not be read as a GGUF file ({exc}): pass a valid .gguf") from None
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            out[key] = (field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    return out


def token_count(fields: dict[str, tuple]) -> int | None:
    """How many tokens a GGUF tokenizer lists (None: it lists none)."""
    tokens = fields.get(gguf.Keys.Tokenizer.LIST)
    return None if tokens is None else len(tokens[0])


def write_gguf_tokenizer(writer: gguf.GGUFWriter, fields: dict[str, tuple]) -> None:
    """The tokenizer fields of another GGUF file (:func:`read_gguf_tokenizer`), written unchanged."""
    for key, (value, kind, sub) in fields.items():
        writer.add_key_value(key, value, kind, sub_type=sub)


def write_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """The tokenizer metadata of a Hugging Face tokenizer, padded to the model's ``n_vocab`` rows.

    A byte-level BPE becomes llama.cpp's ``gpt2`` model (tokens, types, merges, pre-tokenizer); any
    other becomes a ``llama`` (SentencePiece) vocabulary. Token ids are exact either way; for a
    tokenizer that is neither (e.g. word-level) llama.cpp's own text tokenisation will differ.
    """
    spec = backend_spec(tokenizer)
    model = spec.get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    tokens, types = token_table(tokenizer, n_vocab, byte_tokens=not byte_level)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    else:
        if model.get("type") not in ("BPE", "Unigram"):
            log.info("the %s tokenizer has no llama.cpp equivalent: wrote its tokens as a SentencePiece vocabulary "
                     "(token ids are exact; llama.cpp will split text differently)", model.get("type", "custom"))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=byte_level, n_vocab=n_vocab)
    if byte_level and not special.merges:
        raise GluPruneError("the tokenizer is a byte-level BPE without merges: save it again with its tokenizer.json")
    special.add_to_gguf(writer, quiet=True)


def backend_spec(tokenizer) -> dict:
    """The tokenizer.json of a fast tokenizer as a dict ({} when there is none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def token_table(tokenizer, n_vocab: int, byte_tokens: bool) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded with unused tokens up to ``n_vocab``."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise GluPruneError(f"the tokenizer has token ids up to {max(vocab.values())} but the model only "
                            f"{n_vocab} embedding rows: export it with the tokenizer it was trained with")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif byte_tokens and BYTE_TOKEN.fullmatch(text):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    regex = " ".join(str((p.get("pattern") or {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    for fragment, name in PRE_TOKENIZERS:
        if fragment in regex:
            return name
    log.info("the tokenizer's pre-tokenizer has no known llama.cpp name: wrote 'default' (token ids are exact; "
             "llama.cpp may split text differently)")
    return "default"
