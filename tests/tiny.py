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


def hooks_left(model) -> int:
    """Forward hooks and pre-hooks still registered anywhere in ``model``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def random_batches(n_rows=16, seq=12, batch=4, seed=0):
    """Batches of random token ids (no padding), and the ids as one tensor."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n_rows, seq), generator=g)
    return [{"input_ids": ids[i : i + batch]} for i in range(0, n_rows, batch)], ids


def assert_same_stats(a, b, rel=1e-9):
    """Two ActivationStats hold the same layers, counts and per-neuron sums (to ``rel``)."""
    assert a.layers.keys() == b.layers.keys()
    for i in a.layers:
        assert a.layers[i].count == b.layers[i].count
        for f in ("sum", "abs_sum", "sq_sum", "max_abs"):
            torch.testing.assert_close(getattr(a.layers[i], f), getattr(b.layers[i], f), rtol=rel, atol=1e-12)


def stats_for(model):
    """Statistics of ``model`` over one fixed batch of 64 random tokens."""
    from calibrate.run import calibrate

    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    return calibrate(model, [{"input_ids": ids}])


# settings of the small comparison grids in tests/test_compare.py and tests/test_lm_eval.py
GRID_OPTIONS = dict(eval_tokens=256, eval_docs=10, seq_len=64, calib_tokens=512, calib_seq_len=32, progress=False)


def grid_workspace(folder, **overrides):
    """A saved tiny model (``overrides`` to its config) and two small custom corpora (law, food):
    (model folder, corpus specs)."""
    from benchmarks.grid.spec import CorpusSpec

    save_tiny(folder / "model", **overrides)
    corpora = []
    for name, word in (("law", "contract court judge"), ("food", "bread salt oven")):
        path = folder / f"{name}.txt"
        path.write_text("\n\n".join(f"{word} {i} " * 8 for i in range(30)))
        corpora.append(CorpusSpec(name, str(path)))
    return str(folder / "model"), corpora


def reference() -> dict:
    """The reference figures of tests/reference.json (its "source" says how they were measured)."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "reference.json").read_text())


def saved_manifest(folder) -> dict:
    """The pruning manifest a saved model carries in its config.json."""
    import json
    from pathlib import Path

    return json.loads((Path(folder) / "config.json").read_text())["glu_prune"]


def fake_proc(folder, *, version: str = "v2", limit: int | str | None = None, usage: int = 0, inactive: int = 0,
              available: int = 64 << 30, cgroup: str = "/job", mount_root: str = "/"):
    """A stand-in for /proc under ``folder``: MemAvailable ``available``, and this process in the
    memory cgroup ``cgroup`` (``version`` 'v1' or 'v2') whose limit is ``limit`` (a number, 'max',
    or None for no limit file) with ``usage`` bytes in use, ``inactive`` of them reclaimable file cache.
    Returns (the proc folder, the cgroup folder) for :func:`calibrate.resources.memory_limit`."""
    from pathlib import Path

    proc, mount = Path(folder) / "proc", Path(folder) / "sys" / "fs" / "cgroup"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(f"MemTotal: {available // 512} kB\nMemAvailable: {available // 1024} kB\n")
    relative = cgroup[len(mount_root):] if cgroup.startswith(mount_root) else cgroup
    if version == "v1":
        mount = mount / "memory"
        (proc / "self" / "cgroup").write_text(f"5:cpu,cpuacct:/\n4:memory:{cgroup}\n1:name=systemd:/\n")
        (proc / "self" / "mountinfo").write_text(
            f"31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
            f"35 31 0:32 {mount_root} {mount} rw,relatime - cgroup cgroup rw,memory\n")
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    else:
        (proc / "self" / "cgroup").write_text(f"0::{cgroup}\n")
        (proc / "self" / "mountinfo").write_text(f"41 23 0:38 {mount_root} {mount} rw - cgroup2 cgroup2 rw\n")
        names = ("memory.max", "memory.current", "inactive_file")
    group = mount / relative.lstrip("/")
    group.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        (group / names[0]).write_text(f"{limit}\n")
    (group / names[1]).write_text(f"{usage}\n")
    (group / "memory.stat").write_text(f"cache 0\n{names[2]} {inactive}\nrss {usage}\n")
    return proc, group
