"""Issue 29, first measurement: reconstruct each kept MLP locally, layer by layer, on the inputs of
the model whose earlier layers are already pruned, toward a target from the dense model:

- ``mlp``: the dense MLP's output on the dense stream;
- ``layer``: the dense decoder layer's output minus the pruned stream's residual before the MLP,
  so the MLP also corrects the drift that upstream pruning left in the residual stream.

Methods: ``none`` (kept columns as they are), ``lstsq-local`` (the kept down columns refitted in
closed form toward the target, ridge and "as is" chosen on held-out rows), ``mlp`` (that, then Adam
on the kept gate, up and down rows for a bounded number of steps; held-out error decides which
checkpoint is kept, so it is never worse than its start on held-out rows). Families without a norm
after the MLP only (Llama, Mistral, Qwen, SmolLM2). Not in the product yet.

    python -m benchmarks.studies.local_mlp --ratio 0.2 --tokens 8192 --steps 32
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from calibrate.corpora import load_corpus
from calibrate.glu import glu_layers
from calibrate.hooks import HookOwner, real_rows
from calibrate.layerwise import LayerRunner, capture_inputs
from calibrate.models import load_model
from calibrate.perplexity import perplexity
from calibrate.run import split_holdout
from pruning.config import PruneConfig
from pruning.decide import decide
from pruning.local_mlp import Rows, Weights
from pruning.reconstruct import RIDGE_GRID, WALK_START, walk
from pruning.surgery import slice_layer
from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches

TARGETS = ("mlp", "layer")
METHODS = ("none", "lstsq-local", "mlp")


def hidden_of(w: Weights, x: torch.Tensor, act) -> torch.Tensor:
    return act(x @ w.gate.T) * (x @ w.up.T)


def output_of(w: Weights, x: torch.Tensor, act) -> torch.Tensor:
    return hidden_of(w, x, act) @ w.down.T


def local_error(w: Weights, rows: Rows, act, chunk: int = 4096) -> float:
    """Mean over tokens of ``||mlp(x) - t||²``."""
    total = 0.0
    with torch.no_grad():
        for x, t in zip(rows.inputs.split(chunk), rows.targets.split(chunk)):
            total += float((output_of(w, x, act) - t).double().square().sum())
    return total / max(len(rows.inputs), 1)


def closed_form_down(w: Weights, fit: Rows, held: Rows, act) -> tuple[Weights, dict]:
    """The down rows refitted toward ``fit.targets`` in closed form, ``(HᵀH + λI)⁻¹``, the ridge walked
    downhill on held-out rows; the weights as they are when their held-out error is not above it."""
    with torch.no_grad():
        h = hidden_of(w, fit.inputs, act).double()
        gram, cross = h.T @ h / len(h), fit.targets.double().T @ h / len(h)
        h_held = hidden_of(w, held.inputs, act).double()
        scale = gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(len(gram), dtype=torch.float64)
        solved: dict[int, tuple[float, torch.Tensor | None]] = {}

        def error(index: int) -> float:
            if index not in solved:
                factor, info = torch.linalg.cholesky_ex(gram + RIDGE_GRID[index] * scale * eye)
                if info != 0:
                    solved[index] = (float("inf"), None)
                else:
                    down = torch.cholesky_solve(cross.T, factor).T
                    err = float((h_held @ down.T - held.targets.double()).square().sum()) / len(h_held)
                    solved[index] = (err, down)
            return solved[index][0]

        best = walk(error, len(RIDGE_GRID), WALK_START)
        as_is = local_error(w, held, act)
        err, down = solved[best]
        if down is None or as_is <= err:
            return w, {"choice": "as is", "holdout_error": as_is}
        return replace(w, down=down.to(w.down.dtype)), {"choice": "lstsq", "ridge": RIDGE_GRID[best],
                                                       "holdout_error": err, "as_is_error": as_is}


def optimise(w: Weights, fit: Rows, held: Rows, act, steps: int, lr: float = 1e-4, batch: int = 512,
             check_every: int = 8, seed: int = 0) -> tuple[Weights, dict]:
    """Adam on the kept gate, up and down rows toward ``fit.targets``; every ``check_every`` steps
    the held-out error is measured and the best weights seen (the start included) are returned."""
    params = [p.detach().clone().float().requires_grad_(True) for p in (w.gate, w.up, w.down)]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    scale = float(fit.targets.float().square().sum(1).mean()) or 1.0
    best_error, best, best_step = local_error(w, held, act), w, 0
    for step in range(1, steps + 1):
        pick = torch.randint(len(fit.inputs), (batch,), generator=gen)
        current = Weights(*params)
        loss = (output_of(current, fit.inputs[pick], act) - fit.targets[pick]).square().sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == steps:
            trial = Weights(*(p.detach().clone() for p in params))
            error = local_error(trial, held, act)
            if error < best_error:
                best_error, best, best_step = error, trial, step
    return best, {"best_step": best_step, "holdout_error": best_error}


def local_pass(model, plan: dict[int, torch.Tensor], fit_batches: list[dict], held_batches: list[dict],
               target: str, method: str, steps: int) -> dict:
    """Cut ``model`` by ``plan`` in place, one layer at a time, reconstructing each kept MLP by
    ``method`` toward ``target`` (see the module docstring); returns what each layer chose."""
    groups = [capture_inputs(model, fit_batches), capture_inputs(model, held_batches)]
    runner = LayerRunner(model, groups, dense=True)
    choices = {}
    for index in range(len(runner.layers)):
        if index not in plan:
            runner.advance(index)
            continue
        layer = glu_layers(model, [index])[0]
        seen = {}
        with HookOwner() as owned, torch.inference_mode():
            owned.forward_hook(layer.mlp, lambda _m, args, out, seen=seen: seen.update(x=args[0], m=out))
            rows, streams = [], []
            for group, dense_group in zip(runner.groups, runner.dense):
                xs, ts, kept = [], [], []
                for b, d in zip(group, dense_group):
                    d.hidden = runner._run(index, d)
                    dense_mlp = seen["m"]
                    out = runner._run(index, b)
                    x, residual = seen["x"], out - seen["m"]
                    t = dense_mlp if target == "mlp" else d.hidden - residual
                    xs.append(real_rows(x, b.mask))
                    ts.append(real_rows(t, b.mask))
                    kept.append((b, x, residual))
                rows.append((xs, ts))
                streams.append(kept)
        rows = [Rows(torch.cat(xs).float(), torch.cat(ts).float()) for xs, ts in rows]  # outside inference mode
        slice_layer(layer, plan[index])
        act = layer.mlp.act_fn
        w = Weights(layer.gate_weight().detach().float(), layer.up_weight().detach().float(),
                    layer.down_weight().detach().float())
        info = {"none_error": local_error(w, rows[1], act)}
        if method in ("lstsq-local", "mlp"):
            w, found = closed_form_down(w, rows[0], rows[1], act)
            info.update(found)
        if method == "mlp":
            w, found = optimise(w, rows[0], rows[1], act, steps)
            info.update(found)
        with torch.no_grad():
            layer.gate_weight().copy_(w.gate)
            layer.up_weight().copy_(w.up)
            layer.down_weight().copy_(w.down)
            for kept in streams:
                for b, x, residual in kept:
                    b.hidden = residual + layer.mlp(x)
        choices[index] = info
    return choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--runs", default="none:layer,lstsq-local:mlp,lstsq-local:layer,mlp:layer")
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m", dtype="float32")
    corpora = {name: load_corpus(name, part="evaluation") for name in ("wikitext2", "sms_spam")}
    batches = calibration_batches(tok, load_corpus(args.corpus, part="calibration"),
                                  CalibrationSettings(max_tokens=args.tokens))
    fit, held = split_holdout(batches)
    start = time.process_time()
    stats = calibrate_corpus(model, batches, {}, second_moment=False)
    print(f"calibration (first-order): {time.process_time() - start:.1f} CPU s", flush=True)
    plan = decide(model, stats, PruneConfig(ratio=args.ratio)).plan
    print("| method | target | CPU s after calibration | WikiText-2 | SMS | layers refitted / optimised |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for run in args.runs.split(","):
        method, target = run.split(":")
        pruned, _ = load_model("smollm2-135m", dtype="float32")
        start = time.process_time()
        choices = local_pass(pruned, plan, fit, held, target, method, args.steps)
        seconds = time.process_time() - start
        ppl = {name: perplexity(pruned, tok, c, seq_len=512, max_tokens=args.eval_tokens).perplexity
               for name, c in corpora.items()}
        refitted = sum(c.get("choice") == "lstsq" for c in choices.values())
        moved = sum(c.get("best_step", 0) > 0 for c in choices.values())
        print(f"| {method} | {target} | {seconds:.0f} | {ppl['wikitext2']:.2f} | {ppl['sms_spam']:.1f} | "
              f"{refitted} / {moved} |", flush=True)


if __name__ == "__main__":
    main()
