"""Print docs/registry.md from pruning/registry.py, the one table of methods:

    .venv/bin/python scripts/registry_table.py > docs/registry.md
"""

from pruning.registry import ALLOCATIONS, METHODS, RECONSTRUCTIONS, REFIT_TARGETS, SCHEDULES


def yes(flag: bool) -> str:
    return "yes" if flag else ""


def main() -> None:
    lines = ["# Methods, allocations, reconstructions", "",
             "Generated from `pruning/registry.py` by `.venv/bin/python scripts/registry_table.py > docs/registry.md`; "
             "`tests/test_architecture.py` checks that this page matches the registry.", "",
             "## Scores (`--method`)", "", "| name | what it ranks by | statistics | second moments |",
             "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {m.help} | {yes(m.data)} | {yes(m.second_moment)} |" for n, m in METHODS.items()]
    lines += ["", "## Allocations (`--allocation`)", "", "| name | what it does | statistics | calibration text "
              "| offloaded |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {a.help} | {yes(a.needs_stats)} | {yes(a.needs_text)} | {yes(a.streamable)} |"
              for n, a in ALLOCATIONS.items()]
    lines += ["", "## Reconstructions (`--reconstruct`)", "", "| name | what it does | second moments | adds a bias "
              "| offloaded |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {r.help} | {yes(r.second_moment)} | {yes(r.adds_bias)} | {yes(r.streamable)} |"
              for n, r in RECONSTRUCTIONS.items()]
    lines += ["", "## Schedules and refit targets", ""]
    lines += [f"- schedule `{n}`: {s.help}" for n, s in SCHEDULES.items()]
    lines += [f"- refit target `{n}`: {text}" for n, text in REFIT_TARGETS.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
