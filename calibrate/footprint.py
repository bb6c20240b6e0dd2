"""What a layer-by-layer run holds in memory at the peak of each phase, in bytes, from the model's
shapes alone (an empty model is enough): the figures the pre-flight checks compare with the
memory limit (:func:`calibrate.resources.memory_limit`). Pure arithmetic, apart from
:func:`shapes_of`, which reads the sizes off a model's parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate.glu import decoder, decoder_layers, glu_layers
from calibrate.hooks import TOKEN_BLOCK
from calibrate.shards import BLOCK_ELEMENTS, MAX_SHARD_BYTES

F64 = 8
BATCH_COPIES = 8  # a batch's tensors alive inside one decoder layer: gate, up, their product, attention's


@dataclass(frozen=True)
class Shapes:
    """The sizes that bound a layer-by-layer run's memory (bytes in the dtype the model is loaded in)."""

    hidden: int
    widths: list[int]  # the selected layers' intermediate sizes
    itemsize: int
    layer_bytes: int  # the largest decoder layer's weights
    embedding_bytes: int  # the input embedding table, loaded while the inputs are captured
    total_bytes: int  # every weight


def shapes_of(model, layers: list[int] | None = None, dtype: torch.dtype = torch.float32) -> Shapes:
    """:class:`Shapes` of ``model`` (its parameters may be on the meta device)."""
    itemsize = dtype.itemsize

    def size(module) -> int:
        return sum(p.numel() for p in module.parameters()) * itemsize

    return Shapes(model.config.hidden_size, [g.intermediate_size for g in glu_layers(model, layers)], itemsize,
                  max(size(layer) for layer in decoder_layers(model)),
                  size(decoder(model).get_input_embeddings()), size(model))


def moment_bytes(width: int, streams: int = 1) -> int:
    """``streams`` float64 second moments of a layer of ``width`` neurons."""
    return streams * F64 * width * width


def activation_bytes(shapes: Shapes, tokens: int, batch_tokens: int) -> int:
    """The captured hidden states of every calibration token (fit and held-out), and one batch's
    temporaries inside a decoder layer (its MLP's intermediate tensors and attention's)."""
    width = max(shapes.widths, default=shapes.hidden)
    return (tokens * shapes.hidden + BATCH_COPIES * batch_tokens * max(width, shapes.hidden)) * shapes.itemsize


def calibration_peak(shapes: Shapes, tokens: int, batch_tokens: int, streams: int, held: int = 0) -> int:
    """Peak of a layer-by-layer calibration: the embeddings while capturing, then one decoder layer at
    a time with its batches' activations and, with ``streams`` > 0, the layer's float64 second moments
    being summed (``streams`` of them: fit, held-out) and the two float64 buffers of the first-order sums; ``held``:
    the bytes kept from the layers already done (their moments, when they are not spilled)."""
    capture, layer = calibration_phases(shapes, tokens, batch_tokens)
    width = max(shapes.widths, default=0)
    summing = moment_bytes(width, streams) + 2 * F64 * min(TOKEN_BLOCK, tokens) * width  # first-order buffers
    return max(capture, layer + summing) + held


def calibration_phases(shapes: Shapes, tokens: int, batch_tokens: int) -> tuple[int, int]:
    """A layer-by-layer calibration's two phases without second moments: (the embeddings while the
    inputs are captured, the largest decoder layer), each with the activations."""
    activations = activation_bytes(shapes, tokens, batch_tokens)
    return shapes.embedding_bytes + activations, shapes.layer_bytes + activations


def rewrite_peak(shapes: Shapes, held: int = 0) -> int:
    """Peak of a checkpoint rewritten shard by shard (:func:`pruning.stream.write_checkpoint`): a
    shard being filled (at most the whole checkpoint), and the largest GLU tensor read with its
    changed copy, or one block of a larger unchanged tensor as read (float32 at most) and converted
    (embedding tables are copied block by block); ``held``: what is kept meanwhile (refitted weights not spilled)."""
    changed = max(shapes.widths, default=0) * shapes.hidden * shapes.itemsize
    block = min(BLOCK_ELEMENTS, shapes.embedding_bytes // shapes.itemsize) * (4 + shapes.itemsize)
    return min(MAX_SHARD_BYTES, shapes.total_bytes) + max(2 * changed, block) + held
