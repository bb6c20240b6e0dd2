"""What every benchmark measures the same way: a model's parameters and bytes, and a process's resident
memory (now, at its peak since the last reset, and the peak of the children it waited for)."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def parameter_count(model) -> int:
    """Parameters of ``model`` (each tensor of ``model.parameters()`` once: tied weights count once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model) -> int:
    """Bytes of ``model``'s parameters in their dtypes."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def status_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of /proc/self/status in bytes (``VmRSS``: resident now; ``VmHWM``: its peak),
    None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_mib(field: str) -> float:
    """:func:`status_bytes` in MiB, NaN where there is none."""
    value = status_bytes(field)
    return float("nan") if value is None else value / MIB


def reset_peak() -> None:
    """Start this process's peak (``VmHWM``) again from its resident memory now (Linux clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_bytes() -> int:
    """This process's peak resident memory in bytes: ``VmHWM`` (since :func:`reset_peak`), else ru_maxrss."""
    peak = status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def children_peak_bytes() -> int:
    """The largest peak resident memory of the child processes waited for so far, in bytes (ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
