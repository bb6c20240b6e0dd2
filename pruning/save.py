"""Saving pruned models atomically with a model card; the manifest travels in the config."""

from __future__ import annotations

from pathlib import Path

from calibrate.files import atomic_dir
from calibrate.manifest import Manifest
from calibrate.models import detach_gguf_quantizer, load_pruned
from calibrate.stats import library_version
from pruning.prune import manifest_of

__all__ = ["load_pruned", "model_card", "save_pruned"]


def model_card(manifest: Manifest) -> str:
    sizes, uniform = manifest.intermediate_sizes, manifest.uniform
    load = ("from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
            if uniform else "from calibrate import load_pruned  # pip install glu-prune\nmodel = load_pruned(PATH)")
    target = ", ".join(f"{k}={v}" for k, v in manifest.extra.get("target", {}).items())
    stats = manifest.statistics or {}
    calibration = (f"calibrated on `{stats.get('corpus', '?')}` ({stats.get('part', '?')}, "
                   f"{stats.get('tokens', '?')} tokens)" if stats else "static (weights only)")
    depth, width = manifest.depth, manifest.method is not None or manifest.depth is None
    kind, what = (("Depth- and width", "Decoder layers and GLU MLP neurons") if depth and width else
                  ("Depth", "Decoder layers") if depth else ("Width", "GLU MLP neurons"))
    base = manifest.base_model if manifest.base_model is not None else "model"
    version = manifest.library_version if manifest.library_version is not None else library_version()
    card = (f"# {kind}-pruned {base}\n\n"
            f"{what} removed with [glu-prune](https://pypi.org/project/glu-prune/) {version}.\n\n")
    if depth:
        chosen = "named" if depth["score"] == "explicit" else f"the least important by {depth['score']}"
        card += (f"- removed decoder layers {', '.join(map(str, depth['removed_layers']))} of "
                 f"{depth['num_layers_before']} ({chosen}); layer i is the original layer "
                 f"`depth.kept_layers[i]`\n")
    if width:
        card += (f"- method: `{manifest.method}`, {calibration}\n"
                 f"- target: {target}; allocation: {manifest.allocation or 'uniform'}; "
                 f"reconstruct: {manifest.reconstruct or 'none'}\n")
    card += (f"- intermediate sizes: {min(sizes)}..{max(sizes)} over {len(sizes)} layers "
             f"({'uniform' if uniform else 'non-uniform'})\n\n"
             f"What was done, per-layer kept neuron indices included, is in `config.json` under `glu_prune`.\n\n"
             f"```python\n{load}\n```\n")
    healing = manifest.healing
    if healing:
        card += (f"\n## Healing\n\nDistilled from `{healing['teacher']}` on `{healing['corpus']}` "
                 f"({healing['part']} part): {healing['steps']} steps, {healing['tokens']} tokens.\n")
        if healing.get("perplexity_before"):
            card += "\n| corpus (evaluation part) | before | after |\n| --- | ---: | ---: |\n" + "".join(
                f"| {name} | {value:.2f} | {healing['perplexity_after'][name]:.2f} |\n"
                for name, value in healing["perplexity_before"].items())
    return card


def save_pruned(model, tokenizer, out_dir: str | Path, force: bool = False) -> Path:
    """``save_pretrained`` (the manifest is in the config) + tokenizer + model card, written atomically."""
    manifest = manifest_of(model)
    with atomic_dir(out_dir, force=force) as tmp:
        detach_gguf_quantizer(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(manifest))
    return Path(out_dir)
