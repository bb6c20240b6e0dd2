"""Tiny randomly initialised models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2"]

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 3


def tiny_config(family: str, **overrides):
    params = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    return AutoConfig.for_model(family, **params)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny model in eval mode with deterministic random weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).to(dtype)
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' vocabulary (no download)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def save_tiny(folder, family: str = "llama", **overrides):
    """A tiny model saved with its tokenizer in ``folder``; returns the model."""
    model = tiny_model(family, **overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def tiny_workspace(folder, family: str = "llama", **overrides):
    """A saved tiny model with its tokenizer in ``folder/m`` and a 40-document corpus in ``folder/c.txt``."""
    model = save_tiny(folder / "m", family, **overrides)
    (folder / "c.txt").write_text("\n\n".join(f"calibration document {i} " * 6 for i in range(40)))
    return model
