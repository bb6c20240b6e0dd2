"""Sizes and memory: what a computation needs and what the machine has."""

from __future__ import annotations

from pathlib import Path

from calibrate.errors import GluPruneError


def second_moment_bytes(sizes: list[int]) -> int:
    """Memory of the float64 second-moment matrices of layers of these sizes."""
    return sum(8 * s * s for s in sizes)


def available_memory() -> int | None:
    """Available memory in bytes (``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(needed: int, what: str = "the second-moment matrices") -> None:
    """Refuse work whose buffers need more than 80% of the available memory."""
    free = available_memory()
    if free is not None and needed > 0.8 * free:
        raise GluPruneError(f"{what} need {human_bytes(needed)} but only {human_bytes(free)} is available: "
                            f"calibrate fewer layers at a time (--layers) or one layer at a time (--offload)")


def checkpoint_bytes(path: Path | None, kind: str) -> int | None:
    """Size of a local checkpoint's weights (``kind`` 'dir' or 'gguf'; None for a hub id)."""
    if kind == "gguf":
        return Path(path).stat().st_size * 4  # quantised on disk; float32 once converted, roughly
    if kind != "dir":
        return None
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
