"""Depth, width, or both at one parameter count: how many layers and neurons to remove so that
each way removes (as near as whole layers and neurons allow) the same number of parameters.

The rule, for a fraction ``param_ratio`` of the model's total parameters:

- **depth**: the nearest whole number of layers to ``param_ratio * total / layer_params`` (halves
  round up), at least one and fewer than all. The parameters these layers hold are the *budget*
  of the other two plans, so all three remove the same amount.
- **width**: the same number of neurons ``k`` removed from every layer (a uniform intermediate
  size), ``k`` the nearest whole number to ``budget / (layers * neuron_params)``.
- **both**: half of the depth plan's layers (rounded down), then uniform width on the remaining
  layers for the rest of the budget, by the same nearest rule.

So the three plans differ by at most half a neuron per layer. Only :func:`size_profile` reads a
model; everything else is arithmetic on :class:`SizeProfile`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calibrate.errors import GluPruneError
from calibrate.glu import decoder_layers, glu_layers

PLANS = ("depth", "width", "both")


@dataclass(frozen=True)
class SizeProfile:
    """What a removal costs: ``total`` parameters; every decoder layer holds ``layer_params`` and has
    ``intermediate`` GLU neurons of ``neuron_params`` each (gate row, up row, down column, their biases)."""

    total: int
    layers: int
    layer_params: int
    intermediate: int
    neuron_params: int


@dataclass(frozen=True)
class EqualSizePlan:
    """Remove ``remove_layers`` layers, then keep ``intermediate_size`` neurons in every remaining
    layer (None: neurons untouched); ``parameters`` is the predicted count afterwards."""

    kind: str
    param_ratio: float
    remove_layers: int
    intermediate_size: int | None
    parameters: int

    def removed_fraction(self, profile: SizeProfile) -> float:
        return 1 - self.parameters / profile.total


def size_profile(model) -> SizeProfile:
    """The :class:`SizeProfile` of ``model``, counted from its modules; refused for layers of unequal size."""
    blocks = decoder_layers(model)
    sizes = {sum(p.numel() for p in block.parameters()) for block in blocks}
    glus = glu_layers(model)
    widths = {g.intermediate_size for g in glus}
    if len(sizes) != 1 or len(widths) != 1:
        raise GluPruneError("equal-size plans need decoder layers of one size and one intermediate size; "
                            "this model's differ")
    neuron = set()
    for g in glus:
        mlp = sum(p.numel() for p in g.mlp.parameters()) - (g.down.bias.numel() if g.down.bias is not None else 0)
        neuron.add(mlp // g.intermediate_size)
    return SizeProfile(sum(p.numel() for p in model.parameters()), len(blocks), sizes.pop(), widths.pop(),
                       neuron.pop())


def nearest(x: float) -> int:
    return math.floor(x + 0.5)


def after(profile: SizeProfile, remove_layers: int, removed_neurons: int) -> int:
    """Parameters left after removing ``remove_layers`` layers and ``removed_neurons`` from each remaining one."""
    left = profile.layers - remove_layers
    return profile.total - remove_layers * profile.layer_params - left * removed_neurons * profile.neuron_params


def width_neurons(profile: SizeProfile, layers: int, budget: int) -> int:
    """Neurons to remove from each of ``layers`` layers to remove ``budget`` parameters (nearest, within the layer)."""
    k = nearest(budget / (layers * profile.neuron_params)) if budget > 0 else 0
    if k >= profile.intermediate:
        raise GluPruneError(f"removing {budget} parameters by width needs {k} of {profile.intermediate} neurons "
                            f"per layer: choose a smaller --param-ratios")
    return k


def check_param_ratio(param_ratio: float) -> None:
    """Refuse a fraction of the parameters outside (0, 1)."""
    if not 0 < param_ratio < 1:
        raise GluPruneError(f"--param-ratios {param_ratio:g}: must be between 0 and 1 (the fraction of all "
                            f"parameters removed)")


def plan(profile: SizeProfile, param_ratio: float, kind: str) -> EqualSizePlan:
    """The ``kind`` ('depth', 'width' or 'both') plan removing about ``param_ratio`` of the total parameters."""
    if kind not in PLANS:
        raise GluPruneError(f"unknown plan '{kind}': choose from {', '.join(PLANS)}")
    check_param_ratio(param_ratio)
    depth = max(1, nearest(param_ratio * profile.total / profile.layer_params))
    if depth >= profile.layers:
        raise GluPruneError(f"removing {param_ratio:g} of the parameters by depth takes {depth} of the model's "
                            f"{profile.layers} layers: choose a smaller --param-ratios")
    budget = depth * profile.layer_params
    if kind == "depth":
        layers, k = depth, 0
    elif kind == "width":
        layers, k = 0, width_neurons(profile, profile.layers, budget)
    else:
        layers = depth // 2
        if layers == 0:
            raise GluPruneError(f"--param-ratios {param_ratio:g} is one layer's worth: half of it by depth is no "
                                f"layer; choose a larger --param-ratios for depth and width together")
        k = width_neurons(profile, profile.layers - layers, budget - layers * profile.layer_params)
    return EqualSizePlan(kind, param_ratio, layers, profile.intermediate - k if kind != "depth" else None,
                         after(profile, layers, k))
