"""Grid results kept cell by cell in DIR/results.json, each write atomic, so a run can resume.

DIR/settings.json holds every setting the results depend on; a run with other settings is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibrate.errors import GluPruneError
from calibrate.files import write_text

SETTINGS = "settings.json"
RESULT_FILES = ("results.json", "speed.json", "lm_eval.json", "tasks.json")


class ResultStore:
    """Rows keyed by (model, evaluation corpus); reloaded from disk when the folder has them."""

    def __init__(self, out_dir: Path, name: str = "results.json"):
        self.path = Path(out_dir) / name
        self.rows: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def done(self, model: str, corpus: str) -> bool:
        return any(r["model"] == model and r["eval_corpus"] == corpus for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        write_text(self.path, json.dumps(self.rows, indent=1))


def holds_results(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds any result or cached calibration statistics."""
    return any((out_dir / name).is_file() for name in RESULT_FILES) or any((out_dir / "stats").glob("*"))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``name old -> new`` for each setting both hold with different values; nested dicts
    (e.g. corpora by name) are compared entry by entry."""
    found = []
    for key in [k for k in new if k in old]:
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} {a} -> {b}")
    return found


def merged(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s entries added; nested dicts merged the same way."""
    out = dict(old)
    for key, value in new.items():
        out[key] = merged(old[key], value) if isinstance(old.get(key), dict) and isinstance(value, dict) else value
    return out


def record_settings(out_dir: Path, settings: dict) -> None:
    """Refuse a folder whose results were made with other ``settings`` (or with unknown ones), then
    record ``settings`` in DIR/settings.json. Settings only one side has (a new corpus, lm-eval
    tasks) join the record; a folder without results takes the new settings as they are."""
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS
    settings = json.loads(json.dumps(settings))  # as they read back: tuples as lists
    if holds_results(out_dir):
        if not path.is_file():
            raise GluPruneError(f"{out_dir} holds results of an older glu-prune that did not record their settings: "
                                f"use another --out, or delete the folder to start over")
        old = json.loads(path.read_text())
        changed = differences(old, settings)
        if changed:
            raise GluPruneError(f"{out_dir} holds results made with other settings ({'; '.join(changed)}): use "
                                f"another --out, or the same settings to resume")
        settings = merged(old, settings)
    write_text(path, json.dumps(settings, indent=1))
