"""optipfair 0.4.2's width-pruning calls next to glu-prune's on SmolLM2-135M (docs/from-optipfair.md).

    pip install --no-deps --target /tmp/optipfair optipfair==0.4.2
    PYTHONPATH=/tmp/optipfair python -m benchmarks.studies.optipfair_api

Static calls only (no calibration, no evaluation): for each pair, the kept width of both, and how
many kept neurons differ; also whether optipfair accepts ``expansion_rate`` with its default
``pruning_percentage``.
"""

from __future__ import annotations

import copy

import torch

from calibrate import load_model
from pruning import PruneConfig, prune

PAIRS = [
    (dict(pruning_percentage=20), PruneConfig(ratio=0.2, method="ppm")),
    (dict(pruning_percentage=None, expansion_rate=160), PruneConfig(expansion_ratio=1.6, method="ppm")),
    (dict(pruning_percentage=20, expansion_divisor=64), PruneConfig(ratio=0.2, method="ppm", multiple_of=64)),
    (dict(neuron_selection_method="VOW", pruning_percentage=20), PruneConfig(ratio=0.2, method="vow")),
]
SHOWN = ("ratio", "expansion_ratio", "multiple_of", "method")  # the PruneConfig fields printed


def kept_indices(pruned_layer, full_layer) -> set[int]:
    """The neurons of ``full_layer`` that ``pruned_layer`` kept, found by their gate rows."""
    full = full_layer.mlp.gate_proj.weight
    return {int((full == row).all(1).nonzero()[0]) for row in pruned_layer.mlp.gate_proj.weight}


def main() -> None:
    from optipfair import prune_model

    model, _ = load_model("smollm2-135m", device="cpu")
    try:
        prune_model(model=copy.deepcopy(model), expansion_rate=160, show_progress=False)
        print("optipfair: expansion_rate with the default pruning_percentage: accepted")
    except ValueError as exc:
        print(f"optipfair: expansion_rate with the default pruning_percentage: ValueError ({exc})")
    for theirs_args, ours_config in PAIRS:
        args = {"neuron_selection_method": "MAW", **theirs_args}
        theirs = prune_model(model=copy.deepcopy(model), show_progress=False, **args)
        ours = prune(model, None, ours_config)
        differ = sum(len(kept_indices(a, full) ^ set(ours.plan[i].tolist())) // 2
                     for i, (a, full) in enumerate(zip(theirs.model.layers, model.model.layers)))
        width = theirs.model.layers[0].mlp.gate_proj.out_features
        total = sum(len(k) for k in ours.plan.values())
        same = all(torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)
                   for a, b in zip(theirs.model.layers, ours.model.model.layers))
        print(f"prune_model({', '.join(f'{k}={v!r}' for k, v in args.items())}) -> {width} kept; "
              f"PruneConfig({', '.join(f'{k}={v!r}' for k, v in ours_config.as_dict().items() if k in SHOWN)}) "
              f"-> {ours.model.config.intermediate_size} kept; kept neurons that differ: {differ} of {total}; "
              f"identical weights: {same}")


if __name__ == "__main__":
    main()
