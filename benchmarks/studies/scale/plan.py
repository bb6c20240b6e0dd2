"""The arithmetic of docs/scale.md's 8B/70B plan (pure): model shapes, bytes, a fitted power law,
and times from FLOPs at a stated rate. No measurement here: :mod:`benchmarks.studies.scale.costs` measures
the rates this module is given."""

from __future__ import annotations

import math
from dataclasses import dataclass

F64 = 8  # bytes of one float64


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: ``kv_width`` is the k/v projections' output width (kv heads × head dim)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    @property
    def body_flops_per_token(self) -> int:
        """2 × the decoder layers' parameters: the forward that calibration runs (no lm_head; the
        attention's sequence-length term, 4 · seq · hidden per layer, left out)."""
        return 2 * self.layers * self.layer_params

    @property
    def moment_bytes(self) -> int:
        """One layer's float64 x xᵀ (intermediate²)."""
        return self.intermediate**2 * F64

    @property
    def moment_flops_per_token(self) -> int:
        """The x xᵀ update of every layer for one token (addmm: the full square, 2 I² per layer)."""
        return 2 * self.layers * self.intermediate**2

    def held_out_bytes(self, tokens: int | None = None) -> int:
        """One layer's held-out slice: its x xᵀ, or its float32 activations when it has ``tokens``
        (None: unknown, taken as many) no more than the neurons."""
        return self.moment_bytes if tokens is None or tokens > self.intermediate else tokens * self.intermediate * 4

    def stats_file_bytes(self, second_moment: bool, holdout_tokens: int | None = None) -> int:
        """A statistics file: four float64 sums per neuron and layer; with second moments, each layer's
        x xᵀ for the fit and the held-out slice's :meth:`held_out_bytes` (and the slice's sums)."""
        sums = 4 * self.intermediate * F64 * self.layers
        if not second_moment:
            return sums
        return 2 * sums + self.layers * (self.moment_bytes + self.held_out_bytes(holdout_tokens))

    def refitted_down_bytes(self, ratio: float) -> int:
        """Every layer's refitted down_proj in float64, as an offloaded prune holds them until it rewrites."""
        return self.layers * self.hidden * kept(self.intermediate, ratio) * F64


SMOLLM2_135M = Shape("SmolLM2-135M", 30, 576, 1536, 49152, 192, True)
LLAMA_8B = Shape("Llama-3.1-8B", 32, 4096, 14336, 128256, 1024, False)
LLAMA_70B = Shape("Llama-3.1-70B", 80, 8192, 28672, 128256, 1024, False)
SHAPES = (SMOLLM2_135M, LLAMA_8B, LLAMA_70B)


def kept(size: int, ratio: float) -> int:
    return size - round(size * ratio)


@dataclass(frozen=True)
class PowerLaw:
    """A time law of a size ``n``: the cubic ``coefficient · n³`` through the largest measured point
    (``__call__``), and the free power law ``free_coefficient · n**exponent`` of a log-log
    least-squares line (:meth:`free`). Where a library's speed still rises with the size, the free
    exponent is below 3 and the two bracket an extrapolation: the cubic from above."""

    coefficient: float
    exponent: float
    free_coefficient: float

    def __call__(self, n: float) -> float:
        return self.coefficient * n**3

    def free(self, n: float) -> float:
        return self.free_coefficient * n**self.exponent


def fit_cubic(sizes: list[int], seconds: list[float]) -> PowerLaw:
    """:class:`PowerLaw` of the measured ``seconds`` at ``sizes`` (the free law needs two sizes or more)."""
    if len(sizes) != len(seconds) or not sizes:
        raise ValueError("fit_cubic needs one time per size")
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    coefficient = seconds[largest] / sizes[largest] ** 3
    if len(set(sizes)) < 2:
        return PowerLaw(coefficient, float("nan"), float("nan"))
    xs, ys = [math.log(n) for n in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return PowerLaw(coefficient, slope, math.exp(my - slope * mx))


def seconds_at(flops: float, rate: float) -> float:
    """Time of ``flops`` at ``rate`` FLOP/s."""
    return flops / rate


def offload_peak_bytes(shape: Shape, tokens: int, act_bytes: int, batch_tokens: int, refit_extra: float,
                       ratio: float, refit: bool) -> dict[str, int]:
    """What an offloaded ``glu-prune prune`` holds at most, by part (an upper bound: the parts are
    added although the recording and the refit of a layer do not overlap): the input embeddings
    (while the layers' inputs are captured) or one decoder layer's weights, whichever is larger,
    every calibration token's hidden state, one batch's GLU activations (gate, up and
    their product), the fit's and the held-out slice's x xᵀ of one layer, the refit's temporaries
    (``refit_extra`` × one x xᵀ, measured) and, with a refit, every layer's refitted down_proj."""
    parts = {
        "weights": max(shape.layer_params, shape.vocab * shape.hidden) * act_bytes,
        "hidden states": tokens * shape.hidden * act_bytes,
        "batch activations": 3 * batch_tokens * shape.intermediate * act_bytes,
        "second moments": 2 * shape.moment_bytes if refit else 0,
        "refit temporaries": round(refit_extra * shape.moment_bytes) if refit else 0,
        "refitted downs": shape.refitted_down_bytes(ratio) if refit else 0,
    }
    return {**parts, "total": sum(parts.values())}


QWEN2_1_5B = Shape("Qwen2-1.5B", 28, 1536, 8960, 151936, 256, True)  # the 1.5B layer shapes
STRIP = 1024  # calibrate.moments.STRIP: the columns per strip of the symmetric x xᵀ update


def strip_fraction(size: int, strip: int = STRIP) -> float:
    """The share of the full square that the strip-wise x xᵀ update forms: (m + 1) / 2m for m strips."""
    m = max(1, math.ceil(size / strip))
    return (m + 1) / (2 * m)


def layer_flops_per_token(shape: Shape) -> dict[str, float]:
    """One decoder layer, one token: the forward (2 × its parameters), the OLD x xᵀ update (the full
    square, 2 I², float64) and the NEW one (the strips, :func:`strip_fraction` of it, float32)."""
    full = 2 * shape.intermediate**2
    return {"forward": 2 * shape.layer_params, "old moment": full,
            "new moment": strip_fraction(shape.intermediate) * full}


@dataclass(frozen=True)
class Device:
    """Peak rates (FLOP/s) assumed for a projection, and the share of them reached."""

    name: str
    forward: float  # the model's dtype (bf16 on a GPU)
    fp32: float
    fp64: float
    utilisation: float = 0.4


RTX_4090 = Device("RTX 4090", 82.6e12, 82.6e12, 1.29e12)  # bf16 with float32 accumulation: the fp32 rate
H100 = Device("H100 SXM", 989e12, 67e12, 34e12)  # bf16 dense tensor; fp32 and fp64 without tensor cores


def calibration_seconds(shape: Shape, tokens: int, held_fraction: float, rates: dict[str, float]) -> dict:
    """Seconds of a whole model's calibration over ``tokens`` (``held_fraction`` of them held out):
    the forward over all of them, plus the x xᵀ update of the fit tokens, and of the held-out ones
    too for OLD (NEW keeps them as activations when fewer than the width), at ``rates`` (FLOP/s per
    key of :func:`layer_flops_per_token`)."""
    f = layer_flops_per_token(shape)
    held = round(tokens * held_fraction)
    new_moment_tokens = tokens if held > shape.intermediate else tokens - held
    per = {"forward": f["forward"] * tokens / rates["forward"],
           "old moment": f["old moment"] * tokens / rates["old moment"],
           "new moment": f["new moment"] * new_moment_tokens / rates["new moment"]}
    return {k: v * shape.layers for k, v in per.items()}


def device_rates(device: Device) -> dict[str, float]:
    u = device.utilisation
    return {"forward": device.forward * u, "old moment": device.fp64 * u, "new moment": device.fp32 * u,
            "refit": device.fp64 * u}


def refit_flops(shape: Shape, ratio: float, held_tokens: int, ridges: int = 3) -> float:
    """One layer's ``lstsq`` refit as :class:`pruning.reconstruct.RidgeCandidates` runs it on held-out
    rows (float64): the target ``W S[:, K]`` (2 h n k), then per ridge scored a Cholesky
    factorisation (k³ / 3) and the held-out prediction (fewer rows ``t`` than outputs ``h``: the
    rows' solve 2 k² t and the target times it 2 h k t; else the target's solve 2 k² h and its
    product with the rows), and the chosen ridge's solve (2 k² h)."""
    n, h, t = shape.intermediate, shape.hidden, held_tokens
    k = kept(n, ratio)
    per_ridge = k**3 / 3 + 2 * k * k * min(t, h) + 2 * h * k * t
    return 2 * h * n * k + ridges * per_ridge + 2 * k * k * h


def prune_seconds(shape: Shape, tokens: int, held_fraction: float, rates: dict[str, float], ratio: float = 0.2,
                  ridges: int = 3) -> dict[str, float]:
    """A whole model's offloaded prune, projected: the NEW calibration (:func:`calibration_seconds`)
    and every layer's refit (:func:`refit_flops`) at ``rates["refit"]`` (float64 FLOP/s)."""
    c = calibration_seconds(shape, tokens, held_fraction, rates)
    refit = shape.layers * refit_flops(shape, ratio, round(tokens * held_fraction), ridges) / rates["refit"]
    return {"forward": c["forward"], "calibration": c["forward"] + c["new moment"], "refit": refit}


def print_prune_projection(devices: dict[str, dict], tokens: int, held: float, ridges: int) -> None:
    """A markdown table: per model and device (its rates), the projected calibration, refit and
    total ÷ forward of :func:`prune_seconds`."""
    refit_rate = devices["2-core CPU"]["refit"] / 1e9 if "2-core CPU" in devices else float("nan")
    print(f"\nPROJECTION (not measured): the whole prune, {tokens} tokens ({held:.1%} held out), 20%, {ridges} "
          f"ridges scored: calibration (forward + NEW x xᵀ) / refit (float64; the CPU at {refit_rate:.1f} GFLOP/s) "
          "/ total ÷ forward")
    print("| model | " + " | ".join(devices) + " |\n| --- |" + " ---: |" * len(devices))
    for model in (QWEN2_1_5B, LLAMA_8B, LLAMA_70B):
        cells = []
        for rates in devices.values():
            p = prune_seconds(model, tokens, held, rates, ridges=ridges)
            cells.append(f"{duration(p['calibration'])} / {duration(p['refit'])} / "
                         f"{(p['calibration'] + p['refit']) / p['forward']:.1f}×")
        print(f"| {model.name} ({model.layers} × {model.intermediate}) | " + " | ".join(cells) + " |")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


