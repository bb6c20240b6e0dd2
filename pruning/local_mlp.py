"""Local reconstruction of one kept GLU MLP from calibration rows (``reconstruct="mlp"`` and
``"lstsq-local"``): the maths, on tensors only; :func:`pruning.prune.prune_sequential` feeds it the
rows that :meth:`calibrate.layerwise.LayerRunner.local_rows` captures.

The MLP ``f(x) = D (act(G x) ⊙ (U x))`` (kept rows of gate ``G`` and up ``U``, kept columns of down
``D``), possibly followed by a fixed norm ``n`` (Gemma2/3 and OLMo2's post-feedforward norm), is
fitted to targets ``t`` on the fitting rows, in two steps each kept only when it lowers the mean
held-out error ``E||n(f(x)) − t||²`` (so the result is never worse than its start on held-out rows):

1. closed form (without a norm): ``D = T Hᵀ (H Hᵀ + λI)⁻¹`` with ``H = act(G x) ⊙ (U x)``, the
   ridge ``λ`` walked downhill on :data:`pruning.reconstruct.RIDGE_GRID` by held-out error;
2. ``steps`` Adam steps on ``G``, ``U`` and ``D`` (float32, mini-batches of fitting rows, loss
   ``E||n(f(x)) − t||² / E||t||²``), the held-out error measured every few steps and the best
   weights seen, the start included, kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from calibrate.errors import GluPruneError
from pruning.reconstruct import RIDGE_GRID, WALK_START, walk

CHUNK = 4096  # rows per block when errors and Gram matrices are summed


@dataclass(frozen=True)
class Weights:
    """The kept rows of one GLU MLP: gate and up (kept × hidden), down (hidden × kept), float32."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass(frozen=True)
class Form:
    """What of the MLP stays fixed: its activation, its biases (or None) and ``post``, a norm applied
    to its output before the target is compared (None: none)."""

    act: Callable[[torch.Tensor], torch.Tensor]
    biases: tuple = (None, None, None)  # gate, up, down
    post: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Rows:
    """Real-token rows of one layer: the MLP's inputs and what its output should be (tokens × hidden)."""

    inputs: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class Settings:
    """``steps`` Adam steps (0: the closed form only) at learning rate ``lr`` on mini-batches of
    ``batch`` fitting rows, the held-out error checked every ``check_every`` steps; ``seed`` draws
    the mini-batches."""

    steps: int = 32
    lr: float = 1e-4
    batch: int = 512
    check_every: int = 8
    seed: int = 0


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight.T if bias is None else x @ weight.T + bias


def hidden_of(w: Weights, form: Form, x: torch.Tensor) -> torch.Tensor:
    """``act(G x) ⊙ (U x)``, the down projection's input (tokens × kept)."""
    return form.act(_linear(x, w.gate, form.biases[0])) * _linear(x, w.up, form.biases[1])


def output_of(w: Weights, form: Form, x: torch.Tensor, through_post: bool = True) -> torch.Tensor:
    """The MLP's output on rows ``x``, through ``form.post`` unless ``through_post`` is False."""
    out = _linear(hidden_of(w, form, x), w.down, form.biases[2])
    return form.post(out) if through_post and form.post is not None else out


def local_error(w: Weights, form: Form, rows: Rows) -> float:
    """Mean over rows of ``||n(f(x)) − t||²`` (summed in float64)."""
    total = 0.0
    with torch.no_grad():
        for x, t in zip(rows.inputs.split(CHUNK), rows.targets.split(CHUNK)):
            total += float((output_of(w, form, x) - t).double().square().sum())
    return total / max(len(rows.inputs), 1)


def closed_form_down(w: Weights, form: Form, fit: Rows, held: Rows) -> tuple[Weights, dict]:
    """``w`` with its down weight refitted toward ``fit.targets`` in closed form (float64), the ridge
    walked downhill on held-out error; ``w`` unchanged when that is not lower than ``w``'s own."""
    if form.post is not None:
        raise GluPruneError("a closed-form refit cannot fit through a norm after the MLP: fit the dense MLP's "
                            "output (mlp_target='mlp') or use reconstruct mlp")
    start = local_error(w, form, held)
    with torch.no_grad():
        kept = w.down.shape[1]
        gram = torch.zeros(kept, kept, dtype=torch.float64, device=w.down.device)
        cross = torch.zeros(w.down.shape[0], kept, dtype=torch.float64, device=w.down.device)
        bias = form.biases[2]
        for x, t in zip(fit.inputs.split(CHUNK), fit.targets.split(CHUNK)):
            h = hidden_of(w, form, x).double()
            gram += h.T @ h
            cross += (t.double() - (0 if bias is None else bias.double())).T @ h
        scale = gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(kept, dtype=torch.float64, device=gram.device)
        solved: dict[int, tuple[float, Weights | None]] = {}

        def error(index: int) -> float:
            if index not in solved:
                factor, info = torch.linalg.cholesky_ex(gram + RIDGE_GRID[index] * scale * eye)
                if info != 0:
                    solved[index] = (float("inf"), None)
                else:
                    trial = replace(w, down=torch.cholesky_solve(cross.T, factor).T.to(w.down.dtype))
                    solved[index] = (local_error(trial, form, held), trial)
            return solved[index][0]

        best = walk(error, len(RIDGE_GRID), WALK_START)
    err, trial = solved[best]
    if trial is None or start <= err:
        return w, {"closed_form": "kept start", "closed_form_error": err, "start_error": start}
    return trial, {"closed_form": "refitted", "closed_form_ridge": RIDGE_GRID[best], "closed_form_error": err,
                   "start_error": start}


def optimise(w: Weights, form: Form, fit: Rows, held: Rows, settings: Settings) -> tuple[Weights, dict]:
    """Adam on the gate, up and down weights toward ``fit.targets`` for ``settings.steps`` steps; the
    weights with the least held-out error among the start and every checkpoint are returned."""
    params = [p.detach().clone().float().requires_grad_(True) for p in (w.gate, w.up, w.down)]
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    scale = float(fit.targets.double().square().sum(1).mean()) or 1.0
    best_error, best, best_step = local_error(w, form, held), w, 0
    start_error = best_error
    for step in range(1, settings.steps + 1):
        pick = torch.randint(len(fit.inputs), (settings.batch,), generator=generator).to(fit.inputs.device)
        with torch.enable_grad():
            out = output_of(Weights(*params), form, fit.inputs[pick])
            loss = (out - fit.targets[pick]).square().sum(1).mean() / scale
            optimiser.zero_grad()
            loss.backward()
        optimiser.step()
        if step % settings.check_every == 0 or step == settings.steps:
            trial = Weights(*(p.detach().clone() for p in params))
            error = local_error(trial, form, held)
            if error < best_error:
                best_error, best, best_step = error, trial, step
    return best, {"best_step": best_step, "adam_start_error": start_error, "holdout_error": best_error}


def reconstruct_mlp(w: Weights, form: Form, fit: Rows, held: Rows, settings: Settings) -> tuple[Weights, dict]:
    """The closed-form step (skipped when there is a norm after the MLP), then Adam when
    ``settings.steps`` > 0 (see the module docstring); with what each step chose and the
    fitting and held-out errors before and after."""
    info = {"fit_error_start": local_error(w, form, fit)}
    if form.post is None:
        w, found = closed_form_down(w, form, fit, held)
        info.update(found)
    if settings.steps > 0:
        w, found = optimise(w, form, fit, held, settings)
        info.update(found)
    info.update(fit_error=local_error(w, form, fit), holdout_error=local_error(w, form, held))
    return w, info
