"""Owned hooks, and recorders: one forward pre-hook per down_proj, accumulating its input's
statistics on the input's device (moved to the CPU when read): first-order sums in float64, x xᵀ
from float32 products added in float64 (:mod:`calibrate.moments`); with layer importance,
one forward hook per decoder layer, accumulating the cosine of its input and output per token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from calibrate.glu import GLULayer, decoder_layers, glu_layers
from calibrate.layer_importance import LayerSimilarity, token_cosines
from calibrate.moments import MOMENT_BLOCK, add_gram_upper, mirror_upper, product_dtype
from calibrate.stats import LayerStats

TOKEN_BLOCK = 256  # tokens converted to float64 at a time (first-order sums), into two reused buffers


class HookOwner(ExitStack):
    """Installs hooks and stand-in modules through its own methods and undoes every one of them on
    :meth:`remove` or on leaving its ``with`` block, by error and Ctrl-C too (last installed, first undone)."""

    def pre_hook(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> RemovableHandle:
        return self.enter_context(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def forward_hook(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> RemovableHandle:
        return self.enter_context(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def replace(self, modules: nn.ModuleList, index: int, stand_in: nn.Module) -> None:
        """Put ``stand_in`` at ``modules[index]`` until removal, then the original module back."""
        self.callback(modules.__setitem__, index, modules[index])
        modules[index] = stand_in

    def remove(self) -> None:
        self.close()


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (…, features) as (tokens, features), keeping those whose ``mask`` entry is nonzero."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(rows.device).bool()]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(out) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def add_first_order(s: LayerStats, rows: torch.Tensor, block: int = TOKEN_BLOCK) -> None:
    """Add ``rows`` (tokens × size) to the count, sums, |x| sums, x² sums and max |x| of ``s``, in
    float64 on the sums' device: ``block`` rows at a time through two float64 buffers made once per
    call (small buffers reused stay in memory; large fresh ones cost a page fault per page), each
    column sum a float64 matrix-vector product with ones."""
    s.count += rows.shape[0]
    exact = torch.empty(min(block, rows.shape[0]), rows.shape[1], dtype=torch.float64, device=s.sum.device)
    work, ones = torch.empty_like(exact), torch.ones(exact.shape[0], dtype=torch.float64, device=s.sum.device)
    for chunk in rows.split(block):
        x, w, one = exact[:chunk.shape[0]], work[:chunk.shape[0]], ones[:chunk.shape[0]]
        x.copy_(chunk)
        s.sum.addmv_(x.T, one)
        torch.abs(x, out=w)
        s.abs_sum.addmv_(w.T, one)
        torch.maximum(s.max_abs, w.amax(0), out=s.max_abs)
        torch.mul(x, x, out=w)
        s.sq_sum.addmv_(w.T, one)


class StopForward(Exception):
    """Raised by the last recorder so that nothing after the last recorded layer runs."""


class Recorder:
    """Accumulates statistics of one down_proj's input over the tokens where the mask is 1.

    x xᵀ: the real rows are copied (on their device, float32) into a block of ``MOMENT_BLOCK`` rows,
    and its product is added each time it is full (the rest wait for the next batch or the read),
    so the products, and the sums bit for bit, do not depend on the batch size. With
    ``activations`` (and ``second_moment``) it keeps the rows themselves while it has seen no more
    tokens than the layer has neurons, and turns them into a second moment once it has.
    """

    def __init__(self, layer: int, size: int, second_moment: bool = False, activations: bool = False):
        self.layer, self.size, self.second_moment = layer, size, second_moment
        self.mask: torch.Tensor | None = None
        self.stop_after = False
        self._sums: LayerStats | None = None  # on the device of the first input; x xᵀ: upper strips only
        self._rows: list[torch.Tensor] | None = [] if second_moment and activations else None
        self._block: torch.Tensor | None = None  # MOMENT_BLOCK rows' room; the first _filled not yet in x xᵀ
        self._filled = 0

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.accumulate(args[0], self.mask)
        if self.stop_after:
            raise StopForward

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (…, intermediate) whose ``mask`` entry (…) is nonzero."""
        rows = real_rows(x, mask)
        if not rows.shape[0]:
            return
        if self._sums is None:
            self._sums = LayerStats.zeros(self.size, self.second_moment and self._rows is None, rows.device)
        s = self._sums
        add_first_order(s, rows)
        if not self.second_moment:
            return
        if self._rows is not None:
            self._rows.append(rows.to(s.sum.device, product_dtype(rows.dtype), copy=True))
            if s.count <= self.size:
                return
            # more tokens than neurons: the matrix is the smaller form now
            s.second_moment = torch.zeros(self.size, self.size, dtype=torch.float64, device=s.sum.device)
            kept, self._rows = self._rows, None
            for part in kept:
                self._push(part)
        else:
            self._push(rows)

    def _push(self, rows: torch.Tensor) -> None:
        """Copy ``rows`` into the block waiting for x xᵀ, adding its product each time it is full."""
        while rows.shape[0]:
            if self._block is None:
                self._block = torch.empty(MOMENT_BLOCK, self.size, dtype=product_dtype(rows.dtype),
                                          device=self._sums.sum.device)
            take = min(MOMENT_BLOCK - self._filled, rows.shape[0])
            self._block[self._filled:self._filled + take].copy_(rows[:take])
            self._filled, rows = self._filled + take, rows[take:]
            if self._filled == MOMENT_BLOCK:
                add_gram_upper(self._sums.second_moment, self._block)
                self._filled = 0

    def _flush(self) -> None:
        """Add the product of the rows still waiting (fewer than a block) and free the block."""
        if self._filled:
            add_gram_upper(self._sums.second_moment, self._block[:self._filled])
        self._block, self._filled = None, 0

    @property
    def stats(self) -> LayerStats:
        """The statistics so far, on the CPU."""
        if self._sums is None:
            return LayerStats.zeros(self.size, self.second_moment, activations=self._rows is not None)
        if self._rows is not None:
            return replace(self._sums, activations=torch.cat(self._rows)).cpu()
        if self._sums.second_moment is not None:
            self._flush()
            mirror_upper(self._sums.second_moment)
        return self._sums.cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.stats.folded()
        state = {"count": torch.tensor(s.count), "sum": s.sum, "abs_sum": s.abs_sum, "sq_sum": s.sq_sum,
                 "max_abs": s.max_abs}
        if s.second_moment is not None:
            state["second_moment"] = s.second_moment
        return state


class SimilarityRecorder:
    """Accumulates the cosine similarity of one decoder layer's input and output over the tokens where
    the mask is 1: a float64 sum and a count, on the input's device."""

    def __init__(self, layer: int):
        self.layer = layer
        self.mask: torch.Tensor | None = None
        self.stop_after = False
        self.count = 0
        self._cos_sum: torch.Tensor | None = None

    @torch.no_grad()
    def hook(self, module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        x, y = real_rows(layer_input(args, kwargs), self.mask), real_rows(layer_output(out), self.mask)
        if x.shape[0]:
            if self._cos_sum is None:
                self._cos_sum = torch.zeros((), dtype=torch.float64, device=x.device)
            self.count += x.shape[0]
            for xb, yb in zip(x.split(TOKEN_BLOCK), y.split(TOKEN_BLOCK)):
                self._cos_sum += token_cosines(xb, yb).sum()
        if self.stop_after:
            raise StopForward

    @property
    def similarity(self) -> LayerSimilarity:
        return LayerSimilarity(self.count, 0.0 if self._cos_sum is None else float(self._cos_sum))


class Recorders(HookOwner):
    """The recorders of one calibration pass and their hooks; the runner sets each batch's attention mask here."""

    def __init__(self):
        super().__init__()
        self.recorders: list[Recorder] = []
        self.similarities: list[SimilarityRecorder] = []

    def attach(self, layer: GLULayer, second_moment: bool = False, activations: bool = False) -> Recorder:
        recorder = Recorder(layer.index, layer.intermediate_size, second_moment, activations)
        self.pre_hook(layer.down, recorder.hook)
        self.recorders.append(recorder)
        return recorder

    def attach_similarity(self, index: int, layer: nn.Module) -> SimilarityRecorder:
        recorder = SimilarityRecorder(index)
        self.forward_hook(layer, recorder.hook, with_kwargs=True)
        self.similarities.append(recorder)
        return recorder

    def set_mask(self, mask: torch.Tensor | None) -> None:
        for r in [*self.recorders, *self.similarities]:
            r.mask = mask

    def stats(self) -> dict[int, LayerStats]:
        """Every recorder's statistics, on the CPU."""
        return {r.layer: r.stats for r in self.recorders}

    def similarity(self) -> dict[int, LayerSimilarity]:
        """Every decoder layer's input-output cosine sums (layer importance)."""
        return {r.layer: r.similarity for r in self.similarities}


@contextmanager
def recording(model: nn.Module, layers: list[int] | None = None, second_moment: bool = False,
              stop_early: bool = True, layer_importance: bool = False, activations: bool = False
              ) -> Iterator[Recorders]:
    """Attach a recorder to every selected layer's down_proj (and with ``layer_importance`` a
    similarity recorder to the decoder layer itself); every handle is removed on exit, always.

    With ``stop_early`` the last recorder raises :class:`StopForward` once it has accumulated. With
    ``activations`` (and ``second_moment``) a recorder keeps its rows while they are fewer than its neurons.
    """
    with Recorders() as recorders:
        blocks = decoder_layers(model) if layer_importance else None
        for layer in glu_layers(model, layers):
            recorders.attach(layer, second_moment, activations)
            if blocks is not None:
                recorders.attach_similarity(layer.index, blocks[layer.index])
        last = recorders.similarities or recorders.recorders
        if last and stop_early:
            last[-1].stop_after = True
        yield recorders
