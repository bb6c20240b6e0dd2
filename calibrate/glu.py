"""Family adapters: where each decoder layer's GLU MLP parts live.

A GLU MLP computes ``down(act(gate(x)) * up(x))``. Most families keep ``gate_proj``,
``up_proj`` and ``down_proj`` as separate linears; Phi-3 fuses gate and up into one
``gate_up_proj`` whose first half of output rows is the gate and second half the up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibrate.errors import ConfigError, GluPruneError


@dataclass(frozen=True)
class Layout:
    """Attribute names of one GLU MLP layout."""

    down: str = "down_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    fused_gate_up: str | None = None
    bias_flag: str | None = None  # config flag giving gate/up/down biases that stock transformers reloads


SEPARATE = Layout()
SEPARATE_BIASABLE = Layout(bias_flag="mlp_bias")
FUSED = Layout(gate=None, up=None, fused_gate_up="gate_up_proj")

# model_type -> layout. Every family here keeps its decoder layers at ``get_decoder().layers``
# and each layer's MLP at ``layer.mlp``.
ADAPTERS: dict[str, Layout] = {
    "llama": SEPARATE_BIASABLE,
    "mistral": SEPARATE,
    "qwen2": SEPARATE,
    "qwen3": SEPARATE,
    "gemma": SEPARATE,
    "gemma2": SEPARATE,
    "gemma3_text": SEPARATE,
    "granite": SEPARATE_BIASABLE,
    "olmo2": SEPARATE,
    "phi3": FUSED,
}


@dataclass(frozen=True)
class GLULayer:
    """The GLU parts of one decoder layer."""

    index: int
    mlp: nn.Module
    layout: Layout

    @property
    def down(self) -> nn.Linear:
        return getattr(self.mlp, self.layout.down)

    @property
    def fused(self) -> nn.Linear | None:
        return getattr(self.mlp, self.layout.fused_gate_up) if self.layout.fused_gate_up else None

    @property
    def intermediate_size(self) -> int:
        return self.down.in_features

    def gate_weight(self) -> torch.Tensor:
        """Gate rows, shape (intermediate, hidden)."""
        if self.fused is not None:
            return self.fused.weight[: self.intermediate_size]
        return getattr(self.mlp, self.layout.gate).weight

    def up_weight(self) -> torch.Tensor:
        """Up rows, shape (intermediate, hidden)."""
        if self.fused is not None:
            return self.fused.weight[self.intermediate_size :]
        return getattr(self.mlp, self.layout.up).weight

    def down_weight(self) -> torch.Tensor:
        """Down matrix, shape (hidden, intermediate): neuron j is column j."""
        return self.down.weight

    def linears(self) -> list[nn.Linear]:
        """The layer's GLU linears: gate and up (or the fused gate_up), then down."""
        parts = [self.fused] if self.fused is not None else [getattr(self.mlp, self.layout.gate),
                                                             getattr(self.mlp, self.layout.up)]
        return [*parts, self.down]

    def resize_empty(self, size: int) -> None:
        """Give the layer ``size`` neurons as empty (meta-device) linears, to be filled by a state dict."""
        def empty(old: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
            return nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta",
                             dtype=old.weight.dtype)

        hidden = self.down.out_features
        if self.fused is not None:
            setattr(self.mlp, self.layout.fused_gate_up, empty(self.fused, 2 * size, hidden))
        else:
            for name in (self.layout.gate, self.layout.up):
                setattr(self.mlp, name, empty(getattr(self.mlp, name), size, hidden))
        setattr(self.mlp, self.layout.down, empty(self.down, hidden, size))
        if hasattr(self.mlp, "intermediate_size"):
            self.mlp.intermediate_size = size


def supported_families() -> str:
    return ", ".join(sorted(ADAPTERS))


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ADAPTERS:
        name = kind or type(model).__name__
        raise GluPruneError(
            f"model family '{name}' has no GLU MLP adapter; supported families: {supported_families()}"
        )
    return kind


def decoder(model: nn.Module) -> nn.Module:
    """The decoder body (embeddings, layers, final norm) without the LM head."""
    model_type(model)
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def glu_layers(model: nn.Module, layers: list[int] | None = None) -> list[GLULayer]:
    """The GLU parts of every decoder layer (or of ``layers``, in increasing order)."""
    layout = ADAPTERS[model_type(model)]
    blocks = decoder_layers(model)
    indices = check_layers(layers, len(blocks))
    return [GLULayer(i, blocks[i].mlp, layout) for i in indices]


def check_layers(layers: list[int] | None, count: int) -> list[int]:
    """Sorted, unique layer indices; all layers when ``layers`` is None."""
    if layers is None:
        return list(range(count))
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise GluPruneError(f"layer {bad[0]} is out of range: the model has layers 0..{count - 1}")
    if not layers:
        raise ConfigError("layers", layers, "is empty: name at least one layer, e.g. 0-3")
    return sorted(set(layers))


def parse_layers(text: str | None) -> list[int] | None:
    """Parse '0,2,5-7' into [0, 2, 5, 6, 7]; None stays None."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ConfigError("layers", text, "is not a list of layers: use e.g. 0,2,5-7") from None
    return out
