"""Recorders: one forward pre-hook per down_proj, accumulating its input's statistics in float64."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from calibrate.glu import glu_layers
from calibrate.stats import LayerStats

TOKEN_BLOCK = 4096  # tokens per float64 block of the second-moment product


class StopForward(Exception):
    """Raised by the last recorder so that nothing after the last recorded layer runs."""


class Recorder:
    """Accumulates statistics of one down_proj's input over the tokens where the mask is 1."""

    def __init__(self, layer: int, module: nn.Module, size: int, second_moment: bool = False):
        self.layer = layer
        self.stats = LayerStats.zeros(size, second_moment)
        self.mask: torch.Tensor | None = None
        self.stop_after = False
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.accumulate(args[0], self.mask)
        if self.stop_after:
            raise StopForward

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (…, intermediate) whose ``mask`` entry (…) is nonzero."""
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1).to(rows.device).bool()]
        rows = rows.double()
        s = self.stats
        s.count += rows.shape[0]
        s.sum += rows.sum(0).cpu()
        s.abs_sum += rows.abs().sum(0).cpu()
        s.sq_sum += rows.square().sum(0).cpu()
        if rows.shape[0]:
            s.max_abs = torch.maximum(s.max_abs, rows.abs().amax(0).cpu())
        if s.second_moment is not None:
            for block in rows.split(TOKEN_BLOCK):
                s.second_moment += (block.T @ block).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.stats
        state = {"count": torch.tensor(s.count), "sum": s.sum, "abs_sum": s.abs_sum, "sq_sum": s.sq_sum,
                 "max_abs": s.max_abs}
        if s.second_moment is not None:
            state["second_moment"] = s.second_moment
        return state

    def remove(self) -> None:
        self.handle.remove()


class Recorders:
    """The recorders of one calibration pass; the runner sets each batch's attention mask here."""

    def __init__(self, recorders: list[Recorder], stop_early: bool = True):
        self.recorders = recorders
        if recorders and stop_early:
            recorders[-1].stop_after = True

    def set_mask(self, mask: torch.Tensor | None) -> None:
        for r in self.recorders:
            r.mask = mask

    def stats(self) -> dict[int, LayerStats]:
        return {r.layer: r.stats for r in self.recorders}


@contextmanager
def recording(model: nn.Module, layers: list[int] | None = None, second_moment: bool = False,
              stop_early: bool = True) -> Iterator[Recorders]:
    """Attach a recorder to every selected layer's down_proj; every handle is removed on exit, always.

    With ``stop_early`` the last recorder raises :class:`StopForward` once it has accumulated.
    """
    attached: list[Recorder] = []
    try:
        for layer in glu_layers(model, layers):
            attached.append(Recorder(layer.index, layer.down, layer.intermediate_size, second_moment))
        yield Recorders(attached, stop_early)
    finally:
        for recorder in attached:
            recorder.remove()
