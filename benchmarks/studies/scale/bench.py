"""The prune's costs at real layer shapes, old path against new, in one run.

Timing does not depend on the weights, so the models are randomly initialised Llama decoders with
the layer shapes of a 1.5B model (hidden 1536, intermediate 8960, 12 heads, 2 kv heads) or an 8B
model (hidden 4096, intermediate 14336, 32 heads, 8 kv heads), a few layers and a reduced vocabulary,
fed random token ids (the last row of every batch half padding). Per shape it prints:

- a plain forward of the decoder body over the tokens (no hooks);
- calibration as an offloaded ``glu-prune prune`` runs it (layer by layer, a held-out eighth of the
  batches, statistics spilled to files): without second moments, with the OLD float64 x xᵀ
  accumulation (a reference copy of the former ``Recorder.accumulate``, held-out slice as a
  matrix) and with the NEW float32 products (held-out slice as activations when it is smaller
  than the width), each ÷ the plain forward, and the bytes spilled;
- one ``lstsq`` refit per layer: OLD (a reference copy of the former refit: a float64 Cholesky
  per ridge and the held-out error through the held-out second moment) and NEW (whatever
  ``pruning.decide.refit_layer``, as the prune runs it), each ÷ its calibration;
- the whole prune (calibration + ``pruning.prune.prune`` with ``lstsq``, the NEW path; the OLD total
  swaps in the OLD calibration and refit) ÷ the plain forward;
- the prune as an offloaded uniform ``glu-prune prune`` now runs it: each layer scored, planned and
  refitted as soon as it is calibrated (:class:`pruning.decide.CutAsCalibrated`), then the plan
  checked (:func:`pruning.decide.decide`), ÷ the plain forward, with the bytes it spills (none of
  the statistics);
- peak resident memory (and CUDA peak) per phase, and how far the NEW statistics are from the OLD
  ones (max over layers of ||S_new - S_old||_F / ||S_old||_F).

    python -m benchmarks.studies.scale.bench [--shapes 1.5b,8b] [--layers 2,1] [--tokens 2048]
        [--seq-len 128] [--batch-size 2] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N]
        [--no-old-refit] [--no-refit]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.measures import reset_peak, rss_mib
from benchmarks.studies.scale.plan import (
    H100,
    LLAMA_8B,
    LLAMA_70B,
    QWEN2_1_5B,
    RTX_4090,
    Shape,
    calibration_seconds,
    device_rates,
    duration,
    layer_flops_per_token,
    print_prune_projection,
    refit_flops,
)
from benchmarks.studies.scale.reference import float64_accumulation, old_refit
from calibrate.glu import decoder, glu_layers
from calibrate.moments import MOMENT_TOLERANCE
from calibrate.offload import Offloaded, ResidentLoader
from calibrate.progress import showing
from calibrate.spill import spill_bytes
from pruning.config import PruneConfig
from pruning.decide import CutAsCalibrated, Decided, decide, refit_layer
from pruning.prune import prune
from pruning.reconstruct import RIDGE_GRID
from pruning.workflow import calibrate_corpus

MIB = 2**20


@dataclass(frozen=True)
class BenchShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int  # the default number of decoder layers built


SHAPES = {
    "1.5b": BenchShape(1536, 8960, 12, 2, 2),
    "8b": BenchShape(4096, 14336, 32, 8, 1),
    "tiny": BenchShape(64, 176, 4, 2, 2),
}


def build_model(shape: BenchShape, layers: int, vocab: int, device: str, dtype: torch.dtype):
    """A randomly initialised Llama decoder of ``shape`` with ``layers`` layers, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def token_batches(tokens: int, seq_len: int, batch_size: int, vocab: int) -> list[dict]:
    """Random ids, ``tokens`` rows of ``seq_len`` in all; each batch's last row is half padding."""
    g = torch.Generator().manual_seed(1)
    rows = max(2 * batch_size, -(-tokens // seq_len))
    batches = []
    for start in range(0, rows, batch_size):
        ids = torch.randint(0, vocab, (min(batch_size, rows - start), seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, seq_len // 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@contextmanager
def phase(device: str, out: dict):
    """Times the block into ``out['seconds']`` (wall) and ``out['cpu']`` (this process's CPU time, less
    sensitive to other load on the machine), its peak RSS (MiB) into ``out['rss']`` (CUDA peak too)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    yield out
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["cuda"] = torch.cuda.max_memory_allocated() / MIB
    out["seconds"] = time.perf_counter() - start
    out["cpu"] = time.process_time() - cpu
    out["rss"] = rss_mib("VmHWM")


def plain_forward(model, batches: list[dict], device: str) -> dict:
    body = decoder(model)
    with torch.inference_mode():
        body(input_ids=batches[0]["input_ids"].to(device), use_cache=False)  # warm-up
    best: dict = {}
    for _ in range(2):
        with phase(device, {}) as out, torch.inference_mode():
            for b in batches:
                body(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                     use_cache=False)
        best = out if not best or out["seconds"] < best["seconds"] else best
    return best


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def calibration(model, batches: list[dict], device: str, second_moment: bool, old: bool, spill: Path) -> dict:
    """An offloaded prune's calibration (layer by layer, held-out eighth, spilled), OLD or NEW accumulation."""
    patch = float64_accumulation() if old else nullcontext()
    with patch, phase(device, {}) as out:
        with showing(False):
            stats = calibrate_corpus(model, batches, {}, second_moment=second_moment,
                                     offloaded=Offloaded(ResidentLoader(), torch.device(device), spill))
    out["spilled"] = folder_bytes(spill)
    out["stats"] = stats
    return out


def as_calibrated(model, batches: list[dict], device: str, ratio: float, spill: Path) -> dict:
    """The NEW calibration with each layer cut as it is calibrated, then the plan decided and checked."""
    config, decided = PruneConfig(ratio=ratio, reconstruct="lstsq"), Decided()
    with phase(device, {}) as out, showing(False):
        finish = CutAsCalibrated(model, config, decided)
        stats = calibrate_corpus(model, batches, {}, second_moment=True,
                                 offloaded=Offloaded(ResidentLoader(), torch.device(device), spill, finish))
        decide(model, stats, config, decided=decided)
    out["spilled"] = folder_bytes(spill)
    return out


def kept_sets(model, stats, ratio: float) -> dict[int, torch.Tensor]:
    """The same kept neurons for both refits: the largest mean |x| (the refit's cost does not depend on which)."""
    keep = {}
    for layer in glu_layers(model):
        size = layer.intermediate_size
        keep[layer.index] = stats.layers[layer.index].mean_abs.topk(size - round(size * ratio)).indices.sort().values
    return keep


def refits(model, stats, keep: dict, fn, device: str) -> dict:
    """Every layer's refit by ``fn(layer, keep, fit, held)`` on the statistics (spilled files read back)."""
    with phase(device, {}) as out:
        chosen = [fn(layer, keep[layer.index], stats.layers[layer.index], stats.holdout[layer.index])[2]
                  for layer in glu_layers(model)]
    out["scored"] = max((c.get("scored", len(RIDGE_GRID)) for c in chosen), default=0)
    return out


def new_refit(layer, keep, fit, held):
    """The refit as the prune runs it (:func:`pruning.decide.refit_layer`: on the held-out rows when kept)."""
    return refit_layer(layer, keep, "lstsq", fit, held)


def reference_refit(layer, keep, fit, held):
    return old_refit(layer.down_weight().detach().cpu(), keep, fit, held)


def moment_difference(old: dict, new: dict) -> float:
    """max over the layers of ``old`` of ||S_new - S_old||_F / ||S_old||_F."""
    worst = 0.0
    for i in old:
        s_old, s_new = old[i].moment(), new[i].moment()
        worst = max(worst, float((s_new - s_old).norm() / s_old.norm().clamp_min(1e-300)))
    return worst


def bench(name: str, shape: BenchShape, args) -> dict:
    """One shape's figures (also printed)."""
    dtype = getattr(torch, args.dtype)
    layers = args.layer_counts.get(name, shape.layers)
    model = build_model(shape, layers, args.vocab, args.device, dtype)
    batches = token_batches(args.tokens, args.seq_len, args.batch_size, args.vocab)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        forward = plain_forward(model, batches, args.device)
        first = calibration(model, batches, args.device, False, False, work / "first")
        old = calibration(model, batches, args.device, True, True, work / "old")
        new = calibration(model, batches, args.device, True, False, work / "new")
        difference = moment_difference(old["stats"].layers, new["stats"].layers)
        held_difference = moment_difference(old["stats"].holdout, new["stats"].holdout)  # rows spilled in 16 bits
        held_rows = any(s.activations is not None for s in new["stats"].holdout.values())
        held_tokens = next(iter(new["stats"].holdout.values())).count
        announced = spill_bytes([shape.intermediate] * layers, held_tokens)
        fit_tokens = new["stats"].tokens
        new_fit = old_fit = pruned = cut = None
        if args.refit:
            cut = as_calibrated(model, batches, args.device, args.ratio, work / "as-calibrated")
            keep = kept_sets(model, new["stats"], args.ratio)
            new_fit = refits(model, new["stats"], keep, new_refit, args.device)
            old_fit = refits(model, old["stats"], keep, reference_refit, args.device) if args.old_refit else None
            with phase(args.device, {}) as pruned:
                prune(model, new["stats"], PruneConfig(ratio=args.ratio, reconstruct="lstsq"), inplace=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f = forward["seconds"]
    result = {
        "tokens": tokens, "layers": layers, "forward_s": f,
        "first_order_ratio": first["seconds"] / f,
        "old_calibration_ratio": old["seconds"] / f, "new_calibration_ratio": new["seconds"] / f,
        "old_spilled": old["spilled"], "new_spilled": new["spilled"], "difference": difference,
        "held_difference": held_difference,
        "seconds": {k: p["seconds"] for k, p in (("forward", forward), ("first", first), ("old", old), ("new", new))},
        "cpu": {k: p["cpu"] for k, p in (("forward", forward), ("first", first), ("old", old), ("new", new))},
        "fit_tokens": fit_tokens, "held_rows": held_rows, "announced": announced, "held_tokens": held_tokens,
    }
    if pruned is not None:
        rest = max(pruned["seconds"] - new_fit["seconds"], 0.0)  # scoring, planning, cut: the same for both paths
        result["seconds"].update({"new refit": new_fit["seconds"], "prune": pruned["seconds"]})
        result["cpu"].update({"new refit": new_fit["cpu"], "prune": pruned["cpu"]})
        result["new_refit_ratio"] = new_fit["seconds"] / new["seconds"]
        result["new_total_ratio"] = (new["seconds"] + pruned["seconds"]) / f
        result["scored"] = new_fit["scored"]
        result["seconds"]["as calibrated"], result["cpu"]["as calibrated"] = cut["seconds"], cut["cpu"]
        result["as_calibrated_ratio"], result["as_calibrated_spilled"] = cut["seconds"] / f, cut["spilled"]
    if old_fit is not None:
        result["seconds"]["old refit"], result["cpu"]["old refit"] = old_fit["seconds"], old_fit["cpu"]
        result["old_refit_ratio"] = old_fit["seconds"] / old["seconds"]
        result["old_total_ratio"] = (old["seconds"] + old_fit["seconds"] + rest) / f
    print_result(name, shape, args, result, {"forward": forward, "no x xᵀ": first, "old calibration": old,
                                             "new calibration": new, "old refit": old_fit, "new refit": new_fit,
                                             "new prune": pruned, "as calibrated": cut})
    return result


def print_result(name: str, shape: BenchShape, args, r: dict, phases: dict) -> None:
    print(f"\n{name}: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.heads} heads, "
          f"{shape.kv_heads} kv heads, {r['layers']} layer(s), vocab {args.vocab}, {args.dtype} on {args.device}, "
          f"{r['tokens']} tokens (seq_len {args.seq_len}, batch {args.batch_size}), {torch.get_num_threads()} "
          f"thread(s)")
    print(f"{'phase':18} {'seconds':>9} {'s/layer':>9} {'CPU s':>9} {'peak RSS MiB':>13}" + ("  CUDA peak MiB" if
                                                                             args.device.startswith("cuda") else ""))
    for label, p in phases.items():
        if p is not None:
            cuda = f" {p['cuda']:14.0f}" if "cuda" in p else ""
            print(f"{label:18} {p['seconds']:9.2f} {p['seconds'] / r['layers']:9.2f} {p['cpu']:9.2f} "
                  f"{p['rss']:13.0f}{cuda}")
    c, f = r["cpu"], r["cpu"]["forward"]
    by_cpu = [f"calibration ÷ forward: without x xᵀ {c['first'] / f:.2f}, OLD {c['old'] / f:.2f}, "
              f"NEW {c['new'] / f:.2f}"]
    if "new refit" in c:
        old = f"OLD {c['old refit'] / c['old']:.2f}, " if "old refit" in c else ""
        by_cpu += [f"refit ÷ calibration: {old}NEW {c['new refit'] / c['new']:.2f}", f"total ÷ forward: NEW "
                   f"{(c['new'] + c['prune']) / f:.2f}, as calibrated {c['as calibrated'] / f:.2f}"]
    print("by CPU time: " + "; ".join(by_cpu))
    print(f"plain forward: {r['forward_s']:.2f} s ({r['tokens'] / r['forward_s']:.0f} tokens/s)")
    print(f"calibration without x xᵀ ÷ plain forward: {r['first_order_ratio']:.2f}x")
    print(f"calibration with x xᵀ ÷ plain forward: OLD {r['old_calibration_ratio']:.2f}x, "
          f"NEW {r['new_calibration_ratio']:.2f}x")
    if "new_refit_ratio" in r:
        old_refit = f"OLD {r['old_refit_ratio']:.2f}x, " if "old_refit_ratio" in r else ""
        print(f"refit ÷ calibration: {old_refit}NEW {r['new_refit_ratio']:.2f}x")
        old_total = f"OLD {r['old_total_ratio']:.2f}x, " if "old_total_ratio" in r else ""
        print(f"total prune ÷ plain forward: {old_total}NEW {r['new_total_ratio']:.2f}x, each layer refitted as "
              f"calibrated {r['as_calibrated_ratio']:.2f}x (spilled {r['as_calibrated_spilled'] / MIB:.1f} MiB)")
    print(f"bytes spilled: OLD {r['old_spilled'] / MIB:.1f} MiB, NEW {r['new_spilled'] / MIB:.1f} MiB "
          f"({r['new_spilled']} bytes; announced by calibrate.spill.spill_bytes: {r['announced']})")
    verdict = "within" if r["difference"] <= MOMENT_TOLERANCE else "OUTSIDE"
    print(f"statistics NEW against OLD: max ||S_new - S_old||_F / ||S_old||_F = {r['difference']:.2e} "
          f"({verdict} the tolerance {MOMENT_TOLERANCE:g}); held-out slice (rows spilled in 16 bits): "
          f"{r['held_difference']:.2e}")


def measured_rates(r: dict, shape: BenchShape, cores: int = 2) -> dict[str, float]:
    """This machine's FLOP/s for the forward and for each x xᵀ path, from one shape's run, by CPU
    time (per core, times ``cores``: ideal scaling assumed): the recorder's cost is the
    calibration's time beyond the one without x xᵀ."""
    plan_shape = Shape("bench", r["layers"], shape.hidden, shape.intermediate, 0, shape.kv_heads * shape.hidden //
                       shape.heads, True)
    f, t = layer_flops_per_token(plan_shape), {k: v / cores for k, v in r["cpu"].items()}
    layers, tokens, fit = r["layers"], r["tokens"], r["fit_tokens"]
    moment_tokens = fit if r["held_rows"] else tokens  # held-out slice kept as activations: no x xᵀ of it
    return {"forward": f["forward"] * tokens * layers / t["forward"],
            "old moment": f["old moment"] * tokens * layers / max(t["old"] - t["first"], 1e-9),
            "new moment": f["new moment"] * moment_tokens * layers / max(t["new"] - t["first"], 1e-9)}


def project(r: dict, shape: BenchShape, tokens: int = 65536, held: float = 0.125) -> None:
    """Per-layer costs measured here, and whole-model calibration projected to 1.5B, 8B and 70B
    models on this CPU (its measured rates) and two GPUs (assumed rates): the forward, the OLD and
    the NEW x xᵀ update, over ``tokens`` with a ``held`` fraction held out."""
    rates = measured_rates(r, shape)
    per_k = {k: v / r["layers"] / r["tokens"] * 1000 for k, v in r["cpu"].items()}
    print(f"\nCPU seconds per layer and 1000 tokens here: forward {per_k['forward']:.3f} s, calibration without x xᵀ "
          f"{per_k['first']:.3f} s, OLD {per_k['old']:.3f} s, NEW {per_k['new']:.3f} s; refit per layer: "
          + ", ".join(f"{k} {r['seconds'][k] / r['layers']:.1f} s" for k in ("old refit", "new refit")
                      if k in r["seconds"]))
    print("rates: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()) + " (this CPU's 2 cores: "
          "twice the rate per core measured by CPU time)")
    print(f"\nPROJECTION (not measured): calibration of the whole model over {tokens} tokens ({held:.1%} held out): "
          "forward / OLD x xᵀ (float64) / NEW x xᵀ (float32), and calibration ÷ forward OLD → NEW")
    devices = {"2-core CPU": rates, **{d.name: device_rates(d) for d in (RTX_4090, H100)}}
    print("| model | " + " | ".join(devices) + " |\n| --- |" + " ---: |" * len(devices))
    for model in (QWEN2_1_5B, LLAMA_8B, LLAMA_70B):
        cells = []
        for device_rate in devices.values():
            c = calibration_seconds(model, tokens, held, device_rate)
            fwd = c["forward"]
            cells.append(f"{duration(fwd)} / {duration(c['old moment'])} / {duration(c['new moment'])}, "
                         f"{1 + c['old moment'] / fwd:.1f}× → {1 + c['new moment'] / fwd:.1f}×")
        print(f"| {model.name} ({model.layers} × {model.intermediate}) | " + " | ".join(cells) + " |")
    if "new refit" in r["cpu"]:
        project_prune(r, shape, devices, tokens, held)
    print(f"GPU rates assumed (FLOP/s: model dtype / fp32 / fp64, at {H100.utilisation:.0%}): " + "; ".join(
        f"{d.name} {d.forward / 1e12:.1f} / {d.fp32 / 1e12:.1f} / {d.fp64 / 1e12:.2f} T" for d in (RTX_4090, H100)))


def project_prune(r: dict, shape: BenchShape, devices: dict, tokens: int, held: float) -> None:
    """The whole prune projected (:func:`plan.print_prune_projection`), the CPU's float64 refit rate
    from the refit measured here (by CPU time, twice the rate per core)."""
    plan_shape = Shape("bench", r["layers"], shape.hidden, shape.intermediate, 0, 0, True)
    rate = 2 * r["layers"] * refit_flops(plan_shape, 0.2, r["held_tokens"], r["scored"]) / r["cpu"]["new refit"]
    print_prune_projection({k: {**v, "refit": rate} if k == "2-core CPU" else v for k, v in devices.items()},
                           tokens, held, r["scored"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.5b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--layers", default="", help="decoder layers per shape, comma-separated in --shapes order "
                                                     "(default: 2 for 1.5b, 1 for 8b)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-old-refit", dest="old_refit", action="store_false", help="skip the OLD refit (slow)")
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="calibration only: no refit, no prune")
    args = parser.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]}: choose from {', '.join(SHAPES)}")
    counts = [int(n) for n in args.layers.split(",") if n]
    args.names, args.layer_counts = names, dict(zip(names, counts))
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {name: bench(name, SHAPES[name], args) for name in args.names}
    for name in args.names:
        if name != "tiny" and args.device == "cpu":
            project(results[name], SHAPES[name])
    print(f"\ntotal {time.perf_counter() - start:.0f} s; peak RSS of the process {rss_mib('VmHWM'):.0f} MiB (since the "
          f"last phase's reset)")
    return results


if __name__ == "__main__":
    main()
