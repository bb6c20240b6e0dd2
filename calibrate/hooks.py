"""Owned hooks, and recorders: one forward pre-hook per down_proj, accumulating its input's
statistics in float64 on the input's device (moved to the CPU when read); with layer importance,
one forward hook per decoder layer, accumulating the cosine of its input and output per token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from calibrate.glu import GLULayer, decoder_layers, glu_layers
from calibrate.layer_importance import LayerSimilarity, token_cosines
from calibrate.stats import LayerStats

TOKEN_BLOCK = 4096  # tokens converted to float64 at a time


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


class StopForward(Exception):
    """Raised by the last recorder so that nothing after the last recorded layer runs."""


class Recorder:
    """Accumulates statistics of one down_proj's input over the tokens where the mask is 1."""

    def __init__(self, layer: int, size: int, second_moment: bool = False):
        self.layer, self.size, self.second_moment = layer, size, second_moment
        self.mask: torch.Tensor | None = None
        self.stop_after = False
        self._sums: LayerStats | None = None  # on the device of the first input

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
            self._sums = LayerStats.zeros(self.size, self.second_moment, rows.device)
        s = self._sums
        s.count += rows.shape[0]
        for block in rows.split(TOKEN_BLOCK):
            block = block.to(s.sum.device, torch.float64)
            magnitude = block.abs()
            s.sum += block.sum(0)
            s.abs_sum += magnitude.sum(0)
            s.sq_sum += block.square().sum(0)
            torch.maximum(s.max_abs, magnitude.amax(0), out=s.max_abs)
            if s.second_moment is not None:
                s.second_moment.addmm_(block.T, block)

    @property
    def stats(self) -> LayerStats:
        """The statistics so far, on the CPU."""
        return LayerStats.zeros(self.size, self.second_moment) if self._sums is None else self._sums.cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.stats
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

    def attach(self, layer: GLULayer, second_moment: bool = False) -> Recorder:
        recorder = Recorder(layer.index, layer.intermediate_size, second_moment)
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
              stop_early: bool = True, layer_importance: bool = False) -> Iterator[Recorders]:
    """Attach a recorder to every selected layer's down_proj (and with ``layer_importance`` a
    similarity recorder to the decoder layer itself); every handle is removed on exit, always.

    With ``stop_early`` the last recorder raises :class:`StopForward` once it has accumulated.
    """
    with Recorders() as recorders:
        blocks = decoder_layers(model) if layer_importance else None
        for layer in glu_layers(model, layers):
            recorders.attach(layer, second_moment)
            if blocks is not None:
                recorders.attach_similarity(layer.index, blocks[layer.index])
        last = recorders.similarities or recorders.recorders
        if last and stop_early:
            last[-1].stop_after = True
        yield recorders
