"""What every benchmark measures the same way: a model's parameters and bytes, a process's resident
memory (now, at its peak since the last reset, and the peak of the children it waited for), and runs
under a real memory limit (a new cgroup, files dropped from the page cache first)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from calibrate.files import drop_cached

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


class Cgroup:
    """A new memory cgroup with ``limit`` bytes (None: no limit, to measure the peak), under this
    process's own group (v1) or the hierarchy's root (v2); removed on exit."""

    def __init__(self, limit: int | None, name: str):
        from calibrate.resources import cgroup_dirs, cgroup_mounts

        dirs, mounts = cgroup_dirs(), cgroup_mounts()
        if "v1" in dirs:
            self.version, parent = "v1", dirs["v1"]
        elif "v2" in mounts:
            self.version, parent = "v2", mounts["v2"][1]
        else:
            raise PermissionError("no cgroup memory controller is mounted")
        self.folder, self.limit = parent / f"{name}-{os.getpid()}", limit

    @staticmethod
    def unavailable() -> str | None:
        """Why no limited group can be made here, or None when one can."""
        try:
            with Cgroup(64 * MIB, "glu-prune-probe"):
                return None
        except (OSError, PermissionError) as exc:
            return f"cannot create a memory cgroup here ({exc})"

    def write(self, name: str, value: str) -> None:
        (self.folder / name).write_text(value)

    def __enter__(self) -> Cgroup:
        if self.version == "v2":
            controls = self.folder.parent / "cgroup.subtree_control"
            if "memory" not in controls.read_text().split():
                controls.write_text("+memory")
        self.folder.mkdir()
        try:
            if self.limit is not None:
                if self.version == "v1":
                    self.write("memory.limit_in_bytes", str(self.limit))
                    if (self.folder / "memory.memsw.limit_in_bytes").exists():
                        self.write("memory.memsw.limit_in_bytes", str(self.limit))  # no swap either
                else:
                    self.write("memory.max", str(self.limit))
                    if (self.folder / "memory.swap.max").exists():
                        self.write("memory.swap.max", "0")
        except BaseException:
            self.folder.rmdir()
            raise
        return self

    def join(self) -> None:
        """Put the calling process in the group (a child's preexec_fn, before it runs the command)."""
        self.write("cgroup.procs", str(os.getpid()))

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        return int((self.folder / name).read_text().split()[0])

    def oom_kills(self) -> int:
        events = self.folder / ("memory.oom_control" if self.version == "v1" else "memory.events")
        for line in events.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc) -> None:
        for _ in range(50):
            try:
                self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def evict(*roots: Path) -> None:
    """Drop the files under ``roots`` from the page cache, so that a run reads them itself and its
    group is charged for them (a cached page stays charged to the group that first read it)."""
    drop_cached(*roots)
