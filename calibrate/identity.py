"""Which checkpoint a set of statistics belongs to, whatever dtype the model was loaded in.

The identity is every GLU weight's shape and a fixed strided sample of its values (float32).
Two models are the same checkpoint when the shapes are equal and the samples agree to 1%: a
float32 checkpoint loaded in bfloat16 or float16 still matches, another checkpoint does not.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack

import torch

from calibrate.glu import glu_layers

SAMPLES_PER_WEIGHT = 1024
RELATIVE_TOLERANCE = 1e-2


def weight_sample(model, loader=None) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """(shapes, float32 sample) of every GLU weight; ``loader`` fills offloaded MLPs while read, and
    weights that accelerate keeps offloaded are brought in for the read."""
    from accelerate.utils import align_module_device

    shapes, parts = [], []
    with torch.no_grad():
        for layer in glu_layers(model):
            with ExitStack() as stack:
                if loader is not None:
                    stack.enter_context(loader.loaded(layer.mlp))
                for linear in layer.linears():
                    stack.enter_context(align_module_device(linear))
                for w in (layer.gate_weight(), layer.up_weight(), layer.down_weight()):
                    flat = w.detach().reshape(-1)
                    shapes.append(tuple(w.shape))
                    parts.append(flat[:: max(1, flat.numel() // SAMPLES_PER_WEIGHT)].float().cpu())
    return shapes, torch.cat(parts)


def fingerprint(shapes: list[tuple[int, ...]], sample: torch.Tensor) -> str:
    """A short name for an identity (shapes and the bfloat16-rounded sample), for provenance."""
    digest = hashlib.sha256(str(shapes).encode())
    digest.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def same_checkpoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two weight samples come from the same checkpoint (to 1%, any load dtype)."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    # absolute slack of 0.1% of the largest weight: float16 keeps tiny weights only as subnormals
    return torch.allclose(a, b, rtol=RELATIVE_TOLERANCE, atol=1e-3 * float(b.abs().max()))
