"""Per-neuron statistics of the down_proj input, accumulated in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Running sums for one layer's down_proj input (one entry per intermediate neuron).

    ``count`` is the number of (non-padding) tokens seen. ``second_moment`` is ``sum x xᵀ``
    (intermediate × intermediate) when requested, else None. All tensors are float64 on CPU.
    """

    count: int
    sum: torch.Tensor
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    max_abs: torch.Tensor
    second_moment: torch.Tensor | None = None

    @classmethod
    def zeros(cls, size: int, second_moment: bool = False) -> LayerStats:
        z = lambda: torch.zeros(size, dtype=torch.float64)  # noqa: E731
        sm = torch.zeros(size, size, dtype=torch.float64) if second_moment else None
        return cls(0, z(), z(), z(), z(), sm)

    @property
    def size(self) -> int:
        return self.sum.numel()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def rms(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1)).sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance, clamped at 0 against rounding."""
        return (self.sq_sum / max(self.count, 1) - self.mean**2).clamp_min(0)

    @property
    def l2(self) -> torch.Tensor:
        """L2 norm of each neuron's activations over all tokens seen."""
        return self.sq_sum.sqrt()
