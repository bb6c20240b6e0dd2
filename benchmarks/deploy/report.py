"""Tables and the plot of a deployment benchmark: every figure beside its ratio to the same engine's
base model and the ratio the parameter count predicts."""

from __future__ import annotations

from pathlib import Path

from benchmarks.deploy.engines import predicted, speedup

MiB = 2**20


def add_ratios(rows: list[dict], ttft_length: int) -> list[dict]:
    """Each measured row with ``ratios`` against the base model of its engine: speed-ups (higher is
    faster), size and memory as fractions of the base, and the parameter-count predictions."""
    bases = {r["engine"]: r for r in rows if r["model"] == "base" and "error" not in r}
    out = []
    for r in rows:
        base = bases.get(r["engine"])
        if base is None or "error" in r:
            out.append(r)
            continue
        ratios = {f"prefill@{n}": speedup(v, base["prefill_tps"][n]) for n, v in r["prefill_tps"].items()}
        ratios["ttft"] = speedup(r["ttft_ms"][ttft_length], base["ttft_ms"][ttft_length], lower_is_better=True)
        ratios["decode"] = speedup(r["decode_tps"], base["decode_tps"])
        ratios["size"] = r["size_bytes"] / base["size_bytes"]
        ratios["peak"] = model_memory(r) / model_memory(base)
        ratios["predicted_params"] = predicted(base["params"], r["params"])
        ratios["predicted_layers"] = predicted(base["layer_params"], r["layer_params"])
        out.append({**r, "ratios": ratios})
    return out


def model_memory(row: dict) -> int:
    """Peak resident bytes above the engine's imported libraries."""
    return row["peak_bytes"] - row["floor_bytes"]


def cell(value: float, ratio: float | None, fmt: str = "{:.0f}") -> str:
    text = fmt.format(value)
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def engine_table(rows: list[dict], lengths: list[int], ttft_length: int) -> str:
    """One engine's rows: absolute figures, each with its ratio to the base in brackets."""
    head = (["model", "kept", "params M", "size MiB", "peak MiB"] + [f"prefill tok/s @{n}" for n in lengths]
            + [f"TTFT ms @{ttft_length}", "decode tok/s", "predicted (params / layers)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['kept_fraction']:.3f} | " + f"not measured: {r['error']} |")
            continue
        q = r.get("ratios", {}) if r["model"] != "base" else {}
        cells = [r["model"], f"{r['kept_fraction']:.3f}", f"{r['params'] / 1e6:.1f}",
                 cell(r["size_bytes"] / MiB, q.get("size")), cell(model_memory(r) / MiB, q.get("peak"))]
        cells += [cell(r["prefill_tps"][n], q.get(f"prefill@{n}")) for n in lengths]
        cells += [cell(r["ttft_ms"][ttft_length], q.get("ttft"), "{:.1f}"),
                  cell(r["decode_tps"], q.get("decode"), "{:.1f}")]
        cells.append("1.00x / 1.00x" if r["model"] == "base" else
                     f"{q['predicted_params']:.2f}x / {q['predicted_layers']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_markdown(rows: list[dict], lengths: list[int], ttft_length: int) -> str:
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    return "\n\n".join(f"### {e}\n\n" + engine_table([r for r in rows if r["engine"] == e], lengths, ttft_length)
                       for e in engines)


def lengths_markdown(generated: dict[str, dict], kept: dict[str, float]) -> str:
    lines = ["| model | kept | prompts | mean new tokens | median | at the cap |", "|---|---:|---:|---:|---:|---:|"]
    for name, g in generated.items():
        lines.append(f"| {name} | {kept[name]:.3f} | {len(g['lengths'])} | {g['mean']:.1f} | {g['median']:.0f} | "
                     f"{g['at_cap']:.0%} |")
    return "\n".join(lines)


def plot_ratios(rows: list[dict], lengths: list[int], ttft_length: int, path: Path) -> None:
    """Every figure's ratio to the base against the kept fraction: a colour per engine, a line (and
    marker) per multiple-of, each from the base; the parameter-count prediction dashed black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"prefill@{n}" for n in lengths] + ["ttft", "decode", "peak", "size"]
    titles = {"ttft": f"time to first token @{ttft_length} (speed-up)", "decode": "decode (speed-up)",
              "peak": "peak memory (fraction of base)", "size": "file size (fraction of base)",
              **{f"prefill@{n}": f"prefill @{n} tokens (speed-up)" for n in lengths}}
    measured = [r for r in rows if "ratios" in r]
    engines = list(dict.fromkeys(r["engine"] for r in measured))
    multiples = sorted({r["multiple_of"] for r in measured if r["model"] != "base"})
    styles = dict(zip(multiples, [("o", "-"), ("s", "--"), ("D", ":"), ("^", "-."), ("v", "-")]))
    colours = dict(zip(engines, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    cols = 3
    n_rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(13, 3.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for engine in engines:
            base = [(r["kept_fraction"], r["ratios"][key]) for r in measured if r["engine"] == engine
                    and r["model"] == "base"]
            for m in multiples:
                points = sorted(base + [(r["kept_fraction"], r["ratios"][key]) for r in measured
                                        if r["engine"] == engine and r["model"] != "base" and r["multiple_of"] == m])
                marker, line = styles[m]
                ax.plot(*zip(*points), marker=marker, ls=line, color=colours[engine], lw=1, ms=4)
        prediction = "predicted_layers" if key.startswith("prefill") else "predicted_params"
        ideal = sorted({(r["kept_fraction"], r["ratios"][prediction]) for r in measured})
        if key in ("peak", "size"):
            ideal = [(x, 1 / y) for x, y in ideal]
        ax.plot(*zip(*ideal), "k--", lw=1)
        ax.set(title=titles[key], xlabel="kept GLU fraction")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(keys):]
    for ax in spare:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=e) for e, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=mk, ls=ls, label=f"multiple of {m}")
                for m, (mk, ls) in styles.items()]
    handles.append(plt.Line2D([], [], color="k", ls="--", label="parameter count predicts"))
    if spare:
        spare[0].legend(handles=handles, loc="center", fontsize=9)
        fig.tight_layout()
    else:
        fig.legend(handles=handles, loc="lower center", fontsize=8, ncol=len(handles))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
