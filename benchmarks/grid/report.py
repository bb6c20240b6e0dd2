"""Tables and plots of grid results: results.csv, results.md, perplexity.png, heatmap.png (and
speed.png, tasks.png when the grid measured them; equal_size.png for equal-size cells)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from calibrate.files import write_text

COLUMNS = ["model", "method", "ratio", "calibration_corpus", "reconstruct", "schedule", "heal_steps", "heal_lora",
           "allocation", "eval_corpus", "perplexity", "tokens", "ratio_to_base", "parameters", "prune_seconds",
           "eval_seconds"]


def with_base_ratio(rows: list[dict]) -> list[dict]:
    """Rows with ``ratio_to_base``: perplexity divided by the base model's on the same corpus."""
    base = {r["eval_corpus"]: r["perplexity"] for r in rows if r["model"] == "base"}
    return [{**r, "ratio_to_base": r["perplexity"] / base[r["eval_corpus"]] if r["eval_corpus"] in base
             else None} for r in rows]


def to_csv(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS + extra, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def variant(row: dict) -> str:
    """Method with its reconstruction, schedule, allocation and healing, e.g. 'hybrid +lstsq owl healed 100'."""
    rec = f" +{row['reconstruct']}" if row.get("reconstruct", "none") != "none" else ""
    schedule = f" {row['schedule']}" if row.get("schedule", "one-shot") != "one-shot" else ""
    allocation = f" {row['allocation']}" if row.get("allocation", "uniform") not in ("uniform", "") else ""
    healed = f" healed {row['heal_steps']}" if row.get("heal_steps") else ""
    healed += f" LoRA r{row['heal_lora']}" if row.get("heal_lora") else ""
    return f"{row['method']}{rec}{schedule}{allocation}{healed}"


def label(row: dict) -> str:
    if row["model"] == "base":
        return "base"
    return f"{variant(row)} ({row['calibration_corpus'] or 'static'})"


def equal_size(row: dict) -> bool:
    """Whether ``row`` is an equal-size cell (a fraction of all parameters removed)."""
    return row.get("param_ratio") is not None


def share(row: dict) -> str:
    """What a pruned row removed: '20%' of the GLU neurons, or '20% of parameters'."""
    return f"{row['param_ratio']:.0%} of parameters" if equal_size(row) else f"{row['ratio']:.0%}"


def perplexity_cells(ppl: dict, name: str, ratio: float, corpora: list[str], best: dict,
                     base_ppl: dict | None = None) -> list[str]:
    """One table row's perplexity cells: blank where not measured, ``(x base)`` when ``base_ppl`` has
    the corpus, † on the calibration domain, bold where it is the column's ``best``."""
    cells = []
    for c in corpora:
        row = ppl.get((name, ratio, c))
        if row is None:
            cells.append("")
            continue
        times = f" ({row['perplexity'] / base_ppl[c]:.2f})" if base_ppl and c in base_ppl else ""
        text = f"{row['perplexity']:.2f}" + times + (" †" if row["calibration_corpus"] == c else "")
        cells.append(f"**{text}**" if row["perplexity"] == best.get(c) else text)
    return cells


def tuned_base_lines(rows: list[dict], corpora: list[str], lead: str = "") -> list[str]:
    """Table lines of the unpruned model healed alike (the fair baseline of the healed rows), one per
    healing; ``lead``: cells between the name and the perplexities."""
    tuned = {(label(r), 0.0, r["eval_corpus"]): r for r in rows if r["method"] == "base" and r["model"] != "base"}
    return [f"| {name} | {lead}" + " | ".join(perplexity_cells(tuned, name, 0.0, corpora, {})) + " |"
            for name in dict.fromkeys(name for name, _, _ in tuned)]


def markdown_tables(rows: list[dict]) -> str:
    """One table per ratio: models × evaluation corpora; best pruned model per column in bold, and
    the calibration-domain diagonal marked with a dagger. Equal-size cells: :func:`equal_size_tables`."""
    sized = [r for r in rows if equal_size(r)]
    rows = [r for r in rows if not equal_size(r)]
    if sized and all(r["method"] == "base" for r in rows):
        return equal_size_tables(sized, rows)
    corpora = list(dict.fromkeys(r["eval_corpus"] for r in rows))
    ppl = {(label(r), r["ratio"], r["eval_corpus"]): r for r in rows}
    base = [r for r in rows if r["model"] == "base"]
    lines = ["Perplexity (lower is better). **bold**: best pruned model in the column; "
             "†: evaluated on its own calibration domain.", ""]
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != "base"}):
        group = [r for r in rows if r["ratio"] == ratio and r["method"] != "base"]
        models = list(dict.fromkeys(label(r) for r in group))
        best = {c: min((r["perplexity"] for r in group if r["eval_corpus"] == c), default=None) for c in corpora}
        lines += [f"### {ratio:.0%} of GLU neurons removed", "",
                  "| model | " + " | ".join(corpora) + " |", "| --- |" + " ---: |" * len(corpora)]
        if base:
            cells = [f"{ppl[('base', 0.0, c)]['perplexity']:.2f}" if ("base", 0.0, c) in ppl else "" for c in corpora]
            lines.append("| base | " + " | ".join(cells) + " |")
        lines += tuned_base_lines(rows, corpora)
        for name in models:
            lines.append(f"| {name} | " + " | ".join(perplexity_cells(ppl, name, ratio, corpora, best)) + " |")
        lines.append("")
    return "\n".join(lines) + ("\n" + equal_size_tables(sized, [r for r in rows if r["method"] == "base"])
                               if sized else "")


def equal_size_tables(rows: list[dict], unpruned: list[dict]) -> str:
    """One table per fraction of all parameters: each model's layers removed, neurons kept per layer,
    parameter count and perplexity on every corpus (x the base); best per column in bold.
    ``unpruned``: the base's rows and those of the base healed alike."""
    base = [r for r in unpruned if r["model"] == "base"]
    corpora = list(dict.fromkeys(r["eval_corpus"] for r in base + rows))
    ppl = {(label(r), r["param_ratio"], r["eval_corpus"]): r for r in rows}
    base_ppl = {r["eval_corpus"]: r["perplexity"] for r in base}
    lines = ["Equal parameter counts: perplexity (x base; lower is better). **bold**: best in the column; "
             "†: evaluated on its own calibration domain.", ""]
    for ratio in sorted({r["param_ratio"] for r in rows}):
        group = [r for r in rows if r["param_ratio"] == ratio]
        best = {c: min((r["perplexity"] for r in group if r["eval_corpus"] == c), default=None) for c in corpora}
        lines += [f"### {ratio:.0%} of all parameters removed", "",
                  "| model | layers removed | neurons per layer | parameters | " + " | ".join(corpora) + " |",
                  "| --- | --- | ---: | ---: |" + " ---: |" * len(corpora)]
        if base:
            lines.append(f"| base | - | - | {base[0]['parameters']:,} | " +
                         " | ".join(f"{base_ppl[c]:.2f}" if c in base_ppl else "" for c in corpora) + " |")
            lines += tuned_base_lines(unpruned, corpora, f"- | - | {base[0]['parameters']:,} | ")
        for name in dict.fromkeys(label(r) for r in group):
            first = next(r for r in group if label(r) == name)
            cells = perplexity_cells(ppl, name, ratio, corpora, best, base_ppl)
            removed = f"{first['remove_layers']} ({first['removed_layers']})" if first["remove_layers"] else "0"
            lines.append(f"| {name} | {removed} | {first['intermediate_size']} | {first['parameters']:,} | " +
                         " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_perplexity(rows: list[dict], path: Path, x: str = "ratio",
                    xlabel: str = "fraction of GLU neurons removed") -> None:
    """Perplexity against ``x`` (the ratio), one panel per evaluation corpus, one line per method and calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(r["eval_corpus"] for r in rows))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        here = [r for r in rows if r["eval_corpus"] == corpus]
        for name in dict.fromkeys(label(r) for r in here if r["model"] != "base"):
            points = sorted((r[x], r["perplexity"]) for r in here if label(r) == name)
            ax.plot(*zip(*points), marker="o", label=name)
        for r in here:
            if r["model"] == "base":
                ax.axhline(r["perplexity"], color="black", linestyle="--", label="base")
        ax.set(title=f"evaluated on {corpus}", xlabel=xlabel, ylabel="perplexity", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(rows: list[dict], path: Path) -> bool:
    """Calibration corpus × evaluation corpus, perplexity relative to base; a panel per method and ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibrated = [r for r in rows if r["calibration_corpus"] and r["ratio_to_base"] is not None]
    panels = list(dict.fromkeys((variant(r), share(r)) for r in calibrated))
    if not panels:
        return False
    calib = list(dict.fromkeys(r["calibration_corpus"] for r in calibrated))
    evals = list(dict.fromkeys(r["eval_corpus"] for r in calibrated))
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4.2 * cols, 6), 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, ratio) in zip(axes.flat, panels):
        grid = [[next((r["ratio_to_base"] for r in calibrated if (variant(r), share(r), r["calibration_corpus"],
                                                                   r["eval_corpus"]) == (name, ratio, c, e)),
                      float("nan")) for e in evals] for c in calib]
        image = ax.imshow(grid, cmap="viridis_r")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.2f}x", ha="center", va="center", fontsize=9,
                        color="black" if image.norm(value) < 0.3 else "white")
        ax.set_xticks(range(len(evals)), evals, fontsize=8)
        ax.set_yticks(range(len(calib)), calib, fontsize=8)
        ax.set(xlabel="evaluated on", ylabel="calibrated on",
               title=f"{name} {ratio}")
    fig.suptitle("perplexity / base perplexity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SPEED_FIGURES = ["prefill_tokens_per_second", "decode_tokens_per_second", "ttft_ms"]


def speed_table(speed: list[dict]) -> str:
    """Deployment figures of every model, with ratios to the base measured in the same run."""
    base = next((r for r in speed if r["model"] == "base"), None)
    lines = ["### Deployment figures (ratios to the base model, same run)", "",
             "| model | parameters | size MiB | prefill tok/s | decode tok/s | time to first token ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in speed:
        cells = [f"{r[k]:.0f}" + (f" ({r[k] / base[k]:.2f}x)" if base else "") for k in SPEED_FIGURES]
        head = f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.0f} | "
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_speed(speed: list[dict], path: Path) -> None:
    """Bars of each model's speed figures relative to the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in speed if r["model"] == "base")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(speed)), 4))
    width = 0.8 / len(SPEED_FIGURES)
    for k, figure in enumerate(SPEED_FIGURES):
        ax.bar([i + k * width for i in range(len(speed))], [r[figure] / base[figure] for r in speed], width,
               label=figure.replace("_", " "))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width for i in range(len(speed))], [r["model"] for r in speed], rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="relative to base", title="deployment speed (higher is faster; ttft: lower is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lm_eval_table(scores: list[dict]) -> str:
    """lm-evaluation-harness scores of every model (higher is better for accuracies)."""
    names = sorted({k for r in scores for k in r} - {"model", "eval_corpus"})
    lines = ["### lm-evaluation-harness", "", "| model | " + " | ".join(names) + " |",
             "| --- |" + " ---: |" * len(names)]
    lines += [f"| {r['model']} | " + " | ".join(f"{r[n]:.4f}" if n in r else "" for n in names) + " |"
              for r in scores]
    return "\n".join(lines) + "\n"


def task_table(tasks: list[dict]) -> str:
    """Few-shot figures of every model on every labelled task (higher is better)."""
    names = list(dict.fromkeys(r["eval_corpus"].removeprefix("task:") for r in tasks))
    cells = {(r["model"], r["eval_corpus"].removeprefix("task:")): r for r in tasks}
    lines = ["### Labelled tasks (few-shot; balanced accuracy [95% bootstrap interval], the same by the plain "
             "log-likelihood choice, AUC of the label margin)", "",
             "| model | " + " | ".join(f"{n} balanced accuracy | {n} plain choice | {n} AUC" for n in names) + " |",
             "| --- |" + " ---: | ---: | ---: |" * len(names)]
    for model in dict.fromkeys(r["model"] for r in tasks):
        row = []
        for name in names:
            r = cells.get((model, name))
            if r is None:
                row += ["", "", ""]
                continue
            low, high = r["balanced_accuracy_ci"]
            row += [f"{r['balanced_accuracy']:.3f} [{low:.3f}, {high:.3f}]", f"{r['plain_balanced_accuracy']:.3f}",
                    f"{r['auc']:.3f}" if r.get("auc") is not None else "n/a"]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_tasks(tasks: list[dict], path: Path) -> None:
    """Balanced accuracy of every model with its 95% interval, one panel per labelled task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["eval_corpus"] for r in tasks))
    models = list(dict.fromkeys(r["model"] for r in tasks))
    fig, axes = plt.subplots(1, len(names), figsize=(max(6, 0.7 * len(models)) * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        here = {r["model"]: r for r in tasks if r["eval_corpus"] == name}
        shown = [m for m in models if m in here]
        values = [here[m]["balanced_accuracy"] for m in shown]
        errors = [[v - here[m]["balanced_accuracy_ci"][0] for m, v in zip(shown, values)],
                  [here[m]["balanced_accuracy_ci"][1] - v for m, v in zip(shown, values)]]
        ax.bar(range(len(shown)), values, yerr=errors, capsize=3, color="tab:blue")
        ax.axhline(1 / len(here[shown[0]]["recall"]), color="gray", linestyle=":", label="chance")
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"{name.removeprefix('task:')} (few-shot)", ylabel="balanced accuracy", ylim=(0, 1))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(rows: list[dict], out_dir: Path, speed: list[dict] = (), lm_eval: list[dict] = (),
                  tasks: list[dict] = ()) -> list[dict]:
    """Write results.json/csv/md and the plots; returns the rows with ``ratio_to_base``, speed
    figures, lm-eval scores (``lm_eval:task/metric``) and labelled-task figures
    (``task:NAME/balanced_accuracy``, ``task:NAME/auc``) merged into every row of their model."""
    extra: dict[str, dict] = {}
    for r in speed:
        extra.setdefault(r["model"], {}).update({k: r[k] for k in SPEED_FIGURES + ["size_mb"]})
    for r in lm_eval:
        extra.setdefault(r["model"], {}).update({f"lm_eval:{k}": v for k, v in r.items()
                                                 if k not in ("model", "eval_corpus")})
    for r in tasks:
        extra.setdefault(r["model"], {}).update({f"{r['eval_corpus']}/{k}": r[k] for k in
                                                 ("balanced_accuracy", "plain_balanced_accuracy", "auc")})
    rows = [{**r, **extra.get(r["model"], {})} for r in with_base_ratio(rows)]
    write_text(out_dir / "results.json", json.dumps(rows, indent=1))
    write_text(out_dir / "results.csv", to_csv(rows))
    sections = [markdown_tables(rows)] + ([speed_table(speed)] if speed else []) + \
        ([lm_eval_table(lm_eval)] if lm_eval else []) + ([task_table(tasks)] if tasks else [])
    write_text(out_dir / "results.md", "\n".join(sections))
    if any(r["model"] == "base" for r in speed):
        plot_speed(speed, out_dir / "speed.png")
    base = [r for r in rows if r["model"] == "base"]
    if any(not equal_size(r) for r in rows if r["model"] != "base") or not any(equal_size(r) for r in rows):
        plot_perplexity([r for r in rows if not equal_size(r)], out_dir / "perplexity.png")
    if any(equal_size(r) for r in rows):
        plot_perplexity(base + [r for r in rows if equal_size(r)], out_dir / "equal_size.png", x="param_ratio",
                        xlabel="fraction of all parameters removed")
    if tasks:
        plot_tasks(tasks, out_dir / "tasks.png")
    plot_heatmap(rows, out_dir / "heatmap.png")
    return rows
