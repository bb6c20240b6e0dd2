"""Execute the notebooks in notebooks/ and store their outputs in place (what the committed files show).

    GLU_DATA_DIR=../shared/data python scripts/run_notebooks.py [NAME ...]

Budgets come from each notebook's parameters cell (its defaults, or GLU_NB_* environment variables);
the stored outputs are made with the defaults. Needs the dev extra (nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def execute(path: Path, cwd: Path, timeout: int = 1800) -> nbformat.NotebookNode:
    """``path`` executed top to bottom in a fresh kernel that imports this checkout first."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(names: list[str]) -> None:
    paths = [NOTEBOOKS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        nb = execute(path, NOTEBOOKS)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        kernel_cpu = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
        for cell in nb.cells:  # no execution timestamps: a re-run changes only what the outputs say
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s wall, {kernel_cpu:.0f} s of kernel CPU, "
              f"{path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1:])
