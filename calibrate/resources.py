"""Sizes and memory: what a computation needs and what this process may still allocate.

The memory a process may use is the smallest of three limits: the machine's available memory
(``MemAvailable``), its cgroup's limit (containers: Docker ``--memory``, Kubernetes, Slurm; v1
``memory.limit_in_bytes`` or v2 ``memory.max``, less what the group already uses), and its
``RLIMIT_AS`` / ``RLIMIT_DATA`` (less what the process already holds). In a container
``/proc/meminfo`` shows the whole host, so the cgroup is what decides.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from dataclasses import dataclass
from pathlib import Path

from calibrate.errors import GluPruneError

PROC = Path("/proc")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number (2^63 less a page)


@dataclass(frozen=True)
class MemoryLimit:
    """Bytes this process may still allocate, and which limit says so (e.g. "cgroup v2 memory.max
    of 1.2 GiB, 300.0 MiB in use, at /sys/fs/cgroup/job")."""

    bytes: int
    source: str

    @property
    def text(self) -> str:
        return f"{human_bytes(self.bytes)} ({self.source})"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def read_int(path: Path) -> int | None:
    """The number in a one-value file (None if missing, unreadable or 'max')."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def stat_value(path: Path, key: str) -> int:
    """One ``key value`` line of a cgroup ``memory.stat`` (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def machine_limit(proc: Path = PROC) -> MemoryLimit | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryLimit(int(line.split()[1]) * 1024, "MemAvailable, the machine's available memory")
    except OSError:
        pass
    return None


def cgroup_mounts(proc: Path = PROC) -> dict[str, tuple[str, Path]]:
    """{'v1' or 'v2': (the mount's root inside the hierarchy, its mount point)} from mountinfo,
    for the v1 memory controller and the v2 unified hierarchy."""
    mounts = {}
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        root, point = parts[3], Path(parts[4].replace("\\040", " "))
        if rest[0] == "cgroup2":
            mounts.setdefault("v2", (root, point))
        elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
            mounts.setdefault("v1", (root, point))
    return mounts


def cgroup_paths(proc: Path = PROC) -> dict[str, str]:
    """This process's cgroup per hierarchy ('v1' memory controller, 'v2' unified) from /proc/self/cgroup."""
    paths = {}
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    return paths


def cgroup_dirs(proc: Path = PROC) -> dict[str, Path]:
    """The folder of this process's memory cgroup, per version found."""
    dirs = {}
    mounts = cgroup_mounts(proc)
    for version, path in cgroup_paths(proc).items():
        if version not in mounts:
            continue
        root, point = mounts[version]
        relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
        folder = point if relative.startswith("..") or relative == "." else point / relative
        dirs[version] = folder if folder.is_dir() else point  # a namespaced path not visible here: the mount
    return dirs


FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
         "v2": ("memory.max", "memory.current", "inactive_file")}


def cgroup_limit(version: str, folder: Path, top: Path) -> MemoryLimit | None:
    """The tightest limit of ``folder`` and its parents up to the mount point ``top``: the limit less
    the group's use (its inactive file cache excluded: the kernel reclaims it before it kills)."""
    limit_file, usage_file, inactive_key = FILES[version]
    best = None
    while True:
        limit, usage = read_int(folder / limit_file), read_int(folder / usage_file)
        if limit is not None and limit < UNLIMITED and usage is not None:
            used = max(usage - stat_value(folder / "memory.stat", inactive_key), 0)
            free = max(limit - used, 0)
            if best is None or free < best.bytes:
                best = MemoryLimit(free, f"cgroup {version} {limit_file} of {human_bytes(limit)}, "
                                         f"{human_bytes(used)} in use, at {folder}")
        if folder == top or folder.parent == folder or top not in folder.parents:
            return best
        folder = folder.parent


def cgroup_limits(proc: Path = PROC) -> list[MemoryLimit]:
    mounts = cgroup_mounts(proc)
    found = [cgroup_limit(v, folder, mounts[v][1]) for v, folder in cgroup_dirs(proc).items()]
    return [limit for limit in found if limit is not None]


def process_status(proc: Path = PROC) -> dict[str, int]:
    """Sizes (bytes) from /proc/self/status: VmSize (address space), VmData (data + private mappings)."""
    sizes = {}
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmData") and value.split():
                sizes[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return sizes


def rlimit_limits(proc: Path = PROC) -> list[MemoryLimit]:
    """RLIMIT_AS less the address space in use, RLIMIT_DATA less the data in use (soft limits)."""
    found, status = [], process_status(proc)
    for name, used_key in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = status.get(used_key, 0)
        found.append(MemoryLimit(max(soft - used, 0), f"{name} of {human_bytes(soft)}, {human_bytes(used)} in use"))
    return found


def memory_limit(proc: Path | None = None) -> MemoryLimit | None:
    """What this process may still allocate: the smallest of the machine's available memory, its
    cgroup limits and its rlimits; None where none of them is known. ``proc`` stands for /proc
    (default :data:`PROC`); the cgroup folders are where its mountinfo says."""
    proc = proc or PROC
    found = [m for m in (machine_limit(proc), *cgroup_limits(proc), *rlimit_limits(proc)) if m is not None]
    return min(found, key=lambda m: m.bytes) if found else None


def second_moment_bytes(sizes: list[int]) -> int:
    """Memory of the float64 second-moment matrices of layers of these sizes."""
    return sum(8 * s * s for s in sizes)


def check_memory(needed: int, what: str = "the second-moment matrices",
                 hint: str = "calibrate fewer layers at a time (--layers) or one layer at a time (--offload)") -> None:
    """Refuse work whose buffers need more than 80% of what this process may still allocate."""
    limit = memory_limit()
    if limit is not None and needed > 0.8 * limit.bytes:
        raise GluPruneError(f"{what} need {human_bytes(needed)} but only {limit.text} is available: {hint}")


def safetensors_numel(path: Path) -> dict[str, int]:
    """{dtype: element count} of one safetensors file, from its header (no tensor is read)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    counts: dict[str, int] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            n = 1
            for d in entry["shape"]:
                n *= d
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + n
    return counts


FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
INT_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}


def checkpoint_bytes(path: Path | None, kind: str, itemsize: int | None = None) -> int | None:
    """Size of a local safetensors checkpoint's weights (``kind`` 'dir'; None for a hub id); with
    ``itemsize``, of its floating tensors loaded at that many bytes per element."""
    if kind != "dir":
        return None
    files = list(Path(path).glob("*.safetensors"))
    if itemsize is None:
        return sum(p.stat().st_size for p in files)
    total = 0
    for file in files:
        for dtype, n in safetensors_numel(file).items():
            total += n * (itemsize if dtype in FLOAT_TYPES else INT_SIZES.get(dtype, 1))
    return total
