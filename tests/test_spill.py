"""An offloaded prune's disk and memory, said and checked before it starts: the bytes it spills are
the bytes it announced, a spill the disk cannot hold is refused in one line with nothing left
behind, spilling is chosen by the phases' counted peaks, and a phase that cannot fit is refused."""

import contextlib
import io
import logging
import re
import shutil
from collections import namedtuple

import pytest
import torch
from tiny import tiny_workspace

from calibrate import resources, spill
from calibrate.errors import GluPruneError
from calibrate.footprint import Shapes
from calibrate.resources import MemoryLimit
from glu_prune_cli.main import main
from pruning import PruneConfig
from pruning.preflight import plan_offloaded, refit_peak

MiB, GiB = 1 << 20, 1 << 30
Usage = namedtuple("Usage", "total used free")


def prune_args(tmp_path, *extra):
    return (f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --max-tokens 512 "
            f"--method hybrid --ratio 0.25 --reconstruct lstsq --offload --out {tmp_path}/out".split() + list(extra))


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_the_spilled_bytes_are_the_announced_bytes(tmp_path, monkeypatch):
    tiny_workspace(tmp_path)
    written, announced = [], []
    write_raw, check_disk = spill.write_raw, spill.check_disk

    def counting(tensor, path):
        written.append((path.name, write_raw(tensor, path)))
        return written[-1][1]

    monkeypatch.setattr(spill, "write_raw", counting)
    monkeypatch.setattr("pruning.workflow.check_disk", lambda folder, needed, what, *a: (
        announced.append(needed), check_disk(folder, needed, what, *a)))
    code, err = run(prune_args(tmp_path, "--spill-dir", str(tmp_path)))
    assert code == 0, err
    assert re.search(r"note: writing [\d.]+ KiB of the spilled statistics and refitted weights to a temporary folder "
                     rf"in {tmp_path} \([\d.]+ [KMGT]iB free\), removed after use", err), err
    assert announced == [sum(n for _, n in written)] and announced[0] > 0
    # per layer: the fit and held-out x xᵀ (64² float64) and the refitted down weight (32 x 48 float32)
    assert sorted(name for name, _ in written)[:3] == ["layer-0.0.bin", "layer-0.second_moment.bin",
                                                      "layer-0.second_moment.bin"]
    assert announced[0] == 3 * (2 * 64 * 64 * 8 + 32 * 48 * 4)
    assert not list(tmp_path.glob(".out.stats-*"))  # removed after the cut


def test_a_spill_larger_than_the_free_disk_is_refused_in_one_line_with_nothing_left(tmp_path, monkeypatch):
    tiny_workspace(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(GiB, GiB - 10_000, 10_000))
    code, err = run(prune_args(tmp_path, "--spill-dir", str(tmp_path)))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("glu-prune: error: the spilled statistics and refitted weights need ")
    assert f"of disk in {tmp_path} but only 9.8 KiB is free: --spill-dir on a disk with room" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no spill folder


def test_spilled_or_not_the_pruned_checkpoint_is_the_same(tmp_path):
    tiny_workspace(tmp_path)
    from test_stream import tensors

    assert run(prune_args(tmp_path))[0] == 0  # this machine's memory holds the tiny statistics: no spill
    (tmp_path / "out").rename(tmp_path / "held")
    code, err = run(prune_args(tmp_path, "--spill-dir", str(tmp_path)))
    assert code == 0 and "temporary folder" in err
    held, spilled = tensors(tmp_path / "held"), tensors(tmp_path / "out")
    assert held.keys() == spilled.keys() and all(torch.equal(held[k], spilled[k]) for k in held)


SHAPES = Shapes(hidden=896, widths=[4864] * 24, itemsize=4, layer_bytes=60 * MiB, embedding_bytes=519 * MiB,
                largest_tensor=519 * MiB, total_bytes=1885 * MiB)  # a 0.5B model's


def plan(limit):
    return plan_offloaded(SHAPES, PruneConfig(ratio=0.2, reconstruct="lstsq"),
                          None if limit is None else MemoryLimit(limit, "cgroup v1 memory.limit_in_bytes"),
                          tokens=8192, batch_tokens=1024, calibrating=True)


def test_spilling_is_decided_by_each_phase_s_peak():
    moments = 24 * 2 * 8 * 4864**2  # every layer's fit and held-out x xᵀ: 8.5 GiB
    assert not plan(64 * GiB).spill and plan(64 * GiB).peaks["refit"] > moments
    spilled = plan(4 * GiB)
    assert spilled.spill and max(spilled.peaks.values()) <= 0.8 * 4 * GiB
    assert spilled.peaks["refit"] == refit_peak(4864, 3891, 896) + 896 * 3891 * 4
    assert spilled.stats_disk == moments and spilled.refits_disk == 24 * 896 * 3891 * 4
    assert plan(None).spill  # no limit known: spilled, as before the count


def test_a_phase_that_cannot_fit_even_spilled_is_refused_in_one_line_with_the_fix():
    needed = refit_peak(4864, 3891, 896)
    with pytest.raises(GluPruneError) as refused:
        plan(int(needed / 0.8) - 1)
    message = str(refused.value)
    assert message.startswith("the refit of one layer needs ") and "\n" not in message
    assert message.endswith("is available: --reconstruct none (or bias), or a larger memory limit")
    assert not plan_offloaded(SHAPES, PruneConfig(ratio=0.2, reconstruct="none"),
                              MemoryLimit(int(needed / 0.8) - 1, "test"), tokens=8192, batch_tokens=1024,
                              calibrating=True).spill  # without a refit it fits


def test_the_refusal_comes_before_any_work(tmp_path, monkeypatch, caplog):
    """A limit that holds the tiny model but not its refit: refused before calibrating."""
    tiny_workspace(tmp_path)
    monkeypatch.setattr(resources, "memory_limit", lambda: MemoryLimit(200_000, "cgroup v2 memory.max of 1 MiB"))
    with caplog.at_level(logging.INFO, logger="glu_prune"):
        code, err = run(prune_args(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "of one layer needs" in err, err
    assert "second moment:" not in caplog.text and not (tmp_path / "out").exists()


REFIT = """
import re, sys, torch
from calibrate.offload import keep_large_allocations_mapped
from calibrate.stats import LayerStats
from pruning.registry import reconstruct_layer

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

keep_large_allocations_mapped()  # as an offloaded run does
n, hidden, kept = (int(a) for a in sys.argv[1:])
g = torch.Generator().manual_seed(0)

def stats(tokens):
    s = LayerStats.zeros(n, second_moment=True)
    for _ in range(tokens // 256):
        x = torch.randn(256, n, generator=g, dtype=torch.float64)
        s.count += 256
        s.sum += x.sum(0)
        s.sq_sum += (x * x).sum(0)
        s.second_moment.addmm_(x.T, x)
    return s

fit, held, weight = stats(2048), stats(512), torch.randn(hidden, n, generator=g)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
reconstruct_layer("lstsq", weight, torch.arange(kept), fit, held)
print(status("VmHWM") - before)
"""


def test_one_refit_stays_within_the_working_set_the_pre_flight_counts(tmp_path):
    """SmolLM2's width, in a fresh process: the refit's peak above what was held before it (the two raw
    second moments, counted by refit_peak too) stays within refit_peak."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS")
    n, hidden, kept = 1536, 576, 1229
    done = subprocess.run([sys.executable, "-c", REFIT, str(n), str(hidden), str(kept)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1], env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    grew = int(done.stdout.split()[-1])
    counted = refit_peak(n, kept, hidden) - 2 * 8 * n * n
    assert 0.25 * counted < grew <= counted, (grew, counted)  # counted, and not grossly overcounted
