"""Saving pruned models atomically, with a manifest and a model card; reloading non-uniform ones."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.models import detach_gguf_quantizer
from calibrate.stats import library_version
from pruning.surgery import slice_layer

MANIFEST = "pruning.json"


def model_card(manifest: dict) -> str:
    sizes = manifest["intermediate_sizes"]
    uniform = manifest["uniform"]
    load = ("from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
            if uniform else "from pruning import load_pruned\nmodel = load_pruned(PATH)")
    target = ", ".join(f"{k}={v}" for k, v in manifest.get("target", {}).items())
    stats = manifest.get("statistics") or {}
    calibration = (f"calibrated on `{stats.get('corpus', '?')}` ({stats.get('part', '?')}, "
                   f"{stats.get('tokens', '?')} tokens)" if stats else "static (weights only)")
    return (f"# Width-pruned {manifest.get('base_model', 'model')}\n\n"
            f"GLU MLP neurons removed with [glu-prune](https://pypi.org/project/glu-prune/) "
            f"{manifest['library_version']}.\n\n"
            f"- method: `{manifest.get('method')}`, {calibration}\n"
            f"- target: {target}; allocation: {manifest.get('allocation', 'uniform')}\n"
            f"- intermediate sizes: {min(sizes)}..{max(sizes)} over {len(sizes)} layers "
            f"({'uniform' if uniform else 'non-uniform'})\n\n"
            f"Per-layer kept neuron indices are in `{MANIFEST}`.\n\n```python\n{load}\n```\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is removed only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_pruned(model, tokenizer, out_dir: str | Path, manifest: dict, force: bool = False,
                card: str | None = None) -> Path:
    """``save_pretrained`` + tokenizer + ``pruning.json`` + model card, written atomically."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise GluPruneError(f"{out} already exists: pass --force to overwrite it")
    if not out.parent.is_dir():
        raise GluPruneError(f"folder {out.parent} does not exist: create it or choose another --out")
    sizes = [g.intermediate_size for g in glu_layers(model)]
    manifest = {**manifest, "intermediate_sizes": sizes, "uniform": len(set(sizes)) == 1,
                "library_version": library_version()}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise GluPruneError(f"cannot write in {out.parent} ({exc.strerror}): choose another --out") from None
    try:
        detach_gguf_quantizer(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / "README.md").write_text(model_card(manifest) + (f"\n{card}\n" if card else ""))
        replace_dir(tmp, out)
    except OSError as exc:
        raise GluPruneError(f"could not save to {out} ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a model saved by :func:`save_pruned`, also when its layers have different sizes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest_path = path / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"uniform": True}
    if manifest.get("uniform", True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)
        for layer, size in zip(glu_layers(model), manifest["intermediate_sizes"]):
            if size != layer.intermediate_size:
                slice_layer(layer, torch.arange(size))
        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            state.update(load_file(shard))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise GluPruneError(f"{path} does not match its pruning.json (missing {sorted(set(missing) - tied)[:3]}, "
                                f"unexpected {unexpected[:3]}): save it again")
        if tied:
            model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()
