"""The quality frontier: calibration-domain perplexity against CPU seconds spent after calibration.

Reads the measured rows of ``docs/frontier.csv`` (each with the command or table that produced it:
nothing here is measured) and draws one row of panels per ratio, one panel per calibration corpus, every method a
point (healing a line through its checkpoints), the base model a dashed line; writes
``docs/images/frontier.png`` (or ``--out``) and prints the rows as a Markdown table.

    python -m benchmarks.studies.frontier [--csv docs/frontier.csv] [--out docs/images/frontier.png]
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("ratio", "corpus", "method", "seconds", "domain_ppl", "other_ppl", "base_ppl", "source")


def read_rows(path: Path) -> list[dict]:
    """The frontier's rows, numbers parsed; a missing file or column is refused."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give the measured rows with --csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise SystemExit(f"{path}: a row lacks {', '.join(missing)}: add the column")
        for field in ("ratio", "seconds", "domain_ppl", "other_ppl", "base_ppl"):
            row[field] = float(row[field]) if row[field] else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| ratio | calibrated on | method | CPU s after calibration | domain ppl | other corpus | source |",
             "| ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (r["ratio"], r["corpus"], r["seconds"])):
        other = f"{r['other_ppl']:.2f}" if r["other_ppl"] is not None else "–"
        lines.append(f"| {r['ratio']:.0%} | {r['corpus']} | {r['method']} | {r['seconds']:.0f} | "
                     f"{r['domain_ppl']:.2f} | {other} | {r['source']} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ratios, corpora = sorted({r["ratio"] for r in rows}), sorted({r["corpus"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))  # one colour per method in every panel
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(len(ratios), len(corpora), figsize=(6 * len(corpora), 4.4 * len(ratios)),
                             squeeze=False)
    for ax, (ratio, corpus) in zip(axes.flat, ((r, c) for r in ratios for c in corpora)):
        cell = [r for r in rows if (r["ratio"], r["corpus"]) == (ratio, corpus)]
        for method in dict.fromkeys(r["method"] for r in cell):
            points = sorted((r["seconds"], r["domain_ppl"]) for r in cell if r["method"] == method)
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-" if len(points) > 1 else "o", label=method,
                    color=colours(methods.index(method) % colours.N))
        ax.axhline(cell[0]["base_ppl"], color="grey", linestyle="--", label="base (unpruned)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU seconds after calibration (log)")
        ax.set_ylabel(f"{corpus} perplexity (its own domain)")
        ax.set_title(f"{ratio:.0%} removed, calibrated on {corpus}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=REPO / "docs" / "frontier.csv")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "frontier.png")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    plot(rows, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
