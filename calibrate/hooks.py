"""Owned hooks, and recorders: one forward pre-hook per down_proj, accumulating its input's
statistics in float64 on the input's device (moved to the CPU when read)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from calibrate.glu import GLULayer, glu_layers
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


class Recorders(HookOwner):
    """The recorders of one calibration pass and their hooks; the runner sets each batch's attention mask here."""

    def __init__(self):
        super().__init__()
        self.recorders: list[Recorder] = []

    def attach(self, layer: GLULayer, second_moment: bool = False) -> Recorder:
        recorder = Recorder(layer.index, layer.intermediate_size, second_moment)
        self.pre_hook(layer.down, recorder.hook)
        self.recorders.append(recorder)
        return recorder

    def set_mask(self, mask: torch.Tensor | None) -> None:
        for r in self.recorders:
            r.mask = mask

    def stats(self) -> dict[int, LayerStats]:
        """Every recorder's statistics, on the CPU."""
        return {r.layer: r.stats for r in self.recorders}


@contextmanager
def recording(model: nn.Module, layers: list[int] | None = None, second_moment: bool = False,
              stop_early: bool = True) -> Iterator[Recorders]:
    """Attach a recorder to every selected layer's down_proj; every handle is removed on exit, always.

    With ``stop_early`` the last recorder raises :class:`StopForward` once it has accumulated.
    """
    with Recorders() as recorders:
        for layer in glu_layers(model, layers):
            recorders.attach(layer, second_moment)
        if recorders.recorders and stop_early:
            recorders.recorders[-1].stop_after = True
        yield recorders
