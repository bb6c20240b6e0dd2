"""Model surgery: keep only the planned neurons of each GLU MLP (gate/up rows, down columns)."""

from __future__ import annotations

import torch
from torch import nn

from calibrate.errors import GluPruneError
from calibrate.glu import GLULayer, glu_layers
from calibrate.manifest import Manifest, read, write


def sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear holding ``linear``'s rows (dim 0) or columns (dim 1) at ``index``."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
            new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def slice_layer(layer: GLULayer, keep: torch.Tensor) -> None:
    """Replace the layer's GLU linears by their kept neurons, in the order of ``keep``."""
    keep = keep.long()
    mlp, layout, size = layer.mlp, layer.layout, layer.intermediate_size
    if layout.fused_gate_up:
        rows = torch.cat([keep, keep + size])
        setattr(mlp, layout.fused_gate_up, sliced_linear(layer.fused, rows, 0))
    else:
        for name in (layout.gate, layout.up):
            setattr(mlp, name, sliced_linear(getattr(mlp, name), keep, 0))
    setattr(mlp, layout.down, sliced_linear(layer.down, keep, 1))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def check_plan(plan: dict[int, torch.Tensor], sizes: dict[int, int]) -> None:
    for i, keep in plan.items():
        if i not in sizes:
            raise GluPruneError(f"plan names layer {i}, but the model has layers 0..{len(sizes) - 1}")
        if keep.numel() == 0:
            raise GluPruneError(f"plan keeps no neuron of layer {i}: remove less")
        if keep.unique().numel() != keep.numel() or keep.min() < 0 or keep.max() >= sizes[i]:
            raise GluPruneError(f"plan for layer {i} has repeated or out-of-range neurons (size {sizes[i]})")


def apply_plan(model: nn.Module, plan: dict[int, torch.Tensor]) -> list[int]:
    """Slice every planned layer in place, update the config, and return every layer's size.

    When all layers end equal, ``config.intermediate_size`` is that size; every layer's size is
    also recorded in the config's manifest (:mod:`calibrate.manifest`), which reloads unequal ones.
    """
    layers = glu_layers(model)
    check_plan(plan, {g.index: g.intermediate_size for g in layers})
    for g in layers:
        if g.index in plan:
            slice_layer(g, plan[g.index])
    sizes = [g.intermediate_size for g in glu_layers(model)]
    if len(set(sizes)) == 1:
        model.config.intermediate_size = sizes[0]
    write(model.config, (read(model.config) or Manifest(sizes)).updated(intermediate_sizes=sizes))
    return sizes
