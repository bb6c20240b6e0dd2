"""Grid results kept cell by cell in DIR/results.json, each write atomic, so a run can resume."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """Rows keyed by (model, evaluation corpus); reloaded from disk when the folder has them."""

    def __init__(self, out_dir: Path, name: str = "results.json"):
        self.path = Path(out_dir) / name
        self.rows: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def done(self, model: str, corpus: str) -> bool:
        return any(r["model"] == model and r["eval_corpus"] == corpus for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        write_atomic(self.path, json.dumps(self.rows, indent=1))
