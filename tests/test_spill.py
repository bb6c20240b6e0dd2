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


def spill_run(tmp_path, monkeypatch, *extra) -> tuple[str, list, dict, list]:
    """Prune offloaded with a spill folder that is kept (not removed after the cut) and measured after
    every file written or removed: (stderr, the (most held, written) counts announced before anything
    was written, every file ever written with its size, the folder's size after each change)."""
    tiny_workspace(tmp_path)
    announced, kept, sizes, files = [], tmp_path / "kept-spill", [], {}
    check_disk, setitem, release = spill.check_disk, spill.SpilledTensors.__setitem__, spill.SpilledTensors.release

    @contextlib.contextmanager
    def kept_folder(parent, name, wanted):
        kept.mkdir()
        yield str(kept) if wanted else None

    def measured(method):
        def run_and_measure(self, *args):
            method(self, *args)
            now = {str(f.relative_to(kept)): f.stat().st_size for f in kept.rglob("*") if f.is_file()}
            files.update(now)
            sizes.append(sum(now.values()))
        return run_and_measure

    monkeypatch.setattr("pruning.workflow.spill_folder", kept_folder)
    monkeypatch.setattr("pruning.workflow.check_disk", lambda folder, needed, what, *a, **k: (
        announced.append((needed, k["written"])), check_disk(folder, needed, what, *a, **k)))
    monkeypatch.setattr(spill.SpilledTensors, "__setitem__", measured(setitem))
    monkeypatch.setattr(spill.SpilledTensors, "release", measured(release))
    code, err = run(prune_args(tmp_path, "--spill-dir", str(tmp_path), *extra))
    assert code == 0, err
    assert sorted(str(f.relative_to(kept)) for f in kept.rglob("*.bin")) == [
        f"refits/layer-{i}.0.bin" for i in range(3)]  # at the end, the refits only
    return err, announced, files, sizes


@pytest.mark.parametrize("batch", [4, 1])
def test_the_spilled_bytes_are_the_announced_bytes(tmp_path, monkeypatch, batch):
    """The path that refits after calibrating every layer (allocations that plan across layers):
    the bytes written in all and the most held at once equal the two counts announced. Batches of 4
    rows of 32 tokens hold out one batch (128 tokens, more than the 64 neurons: a packed x xᵀ),
    batches of one row hold out two (64 tokens: their rows, in 16 bits)."""
    monkeypatch.setattr("pruning.workflow.cuts_as_calibrated", lambda model, config: False)
    err, announced, files, sizes = spill_run(tmp_path, monkeypatch, "--batch-size", str(batch))
    assert re.search(r"note: writing [\d.]+ KiB of the spilled statistics and refitted weights \(at most [\d.]+ KiB "
                     r"at once: a layer's statistics are removed once it is refitted\) to a temporary folder "
                     rf"in {tmp_path} \([\d.]+ [KMGT]iB free\), removed after use", err), err
    assert announced == [(max(sizes), sum(files.values()))] and max(sizes) > 0, (sizes, files)
    # per layer: the fit x xᵀ as a packed triangle (64 · 65 / 2 float64), the held-out slice (packed, or
    # its 64 rows in 16 bits: no more tokens than the 64 neurons) and the refitted down weight (32 x 48 float32)
    held = {4: ("second_moment", 64 * 65 // 2 * 8), 1: ("activations", 64 * 64 * 2)}[batch]
    assert files["fit/layer-0.second_moment.bin"] == 64 * 65 // 2 * 8
    assert files[f"holdout/layer-0.{held[0]}.bin"] == held[1]
    assert files["refits/layer-0.0.bin"] == 32 * 48 * 4
    stats, refit = 64 * 65 // 2 * 8 + held[1], 32 * 48 * 4
    assert len(files) == 9 and announced[0] == (3 * stats, 3 * (stats + refit))
    assert sizes[-1] == 3 * refit


@pytest.mark.parametrize("batch", [4, 1])
def test_a_uniform_cut_refits_each_layer_as_calibrated_and_spills_only_the_refits(tmp_path, monkeypatch, batch):
    """Uniform allocation, hybrid score, lstsq: each layer is cut while calibrated, its second moments
    never written; the spill holds the three refitted down weights (32 x 48 float32), as announced,
    and the checkpoint equals the one of the path that spills the statistics, bit for bit."""
    from test_stream import tensors

    err, announced, files, sizes = spill_run(tmp_path, monkeypatch, "--batch-size", str(batch))
    assert "note: each layer is refitted as it is calibrated" in err
    assert re.search(rf"note: writing 18.0 KiB of the refitted weights to a temporary folder in {tmp_path} ", err), err
    assert files == {f"refits/layer-{i}.0.bin": 32 * 48 * 4 for i in range(3)}
    assert announced == [(3 * 32 * 48 * 4, 3 * 32 * 48 * 4)] and max(sizes) == 3 * 32 * 48 * 4
    (tmp_path / "out").rename(tmp_path / "as-calibrated")
    monkeypatch.setattr("pruning.workflow.cuts_as_calibrated", lambda model, config: False)
    shutil.rmtree(tmp_path / "kept-spill")
    assert run(prune_args(tmp_path, "--batch-size", str(batch), "--spill-dir", str(tmp_path)))[0] == 0
    after, before = tensors(tmp_path / "as-calibrated"), tensors(tmp_path / "out")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_the_spill_peak_is_the_most_held_at_once():
    assert spill.spill_peak([10, 10, 10], [4, 4, 4]) == 30  # the statistics, before the first refit
    assert spill.spill_peak([10, 10, 10], [15, 15, 15]) == 45  # the refits, once all are written
    assert spill.spill_peak([10, 1], [1, 30]) == 31  # layer 0's removal makes room for part of layer 1's refit
    assert spill.spill_peak([], []) == 0


@pytest.mark.parametrize("as_calibrated", [True, False])
def test_a_spill_larger_than_the_free_disk_is_refused_in_one_line_with_nothing_left(tmp_path, monkeypatch,
                                                                                     as_calibrated):
    tiny_workspace(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(GiB, GiB - 10_000, 10_000))
    if not as_calibrated:
        monkeypatch.setattr("pruning.workflow.cuts_as_calibrated", lambda model, config: False)
    code, err = run(prune_args(tmp_path, "--spill-dir", str(tmp_path)))
    assert code == 2 and err.count("\n") == 1, err
    what = "the refitted weights" if as_calibrated else "the spilled statistics and refitted weights"
    assert err.startswith(f"glu-prune: error: {what} need ")
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
    assert not list(tmp_path.glob(".out.stats-*"))  # the spill folder is removed after the cut


SHAPES = Shapes(hidden=896, widths=[4864] * 24, itemsize=4, layer_bytes=60 * MiB, embedding_bytes=519 * MiB,
                total_bytes=1885 * MiB)  # a 0.5B model's


def plan(limit, held_tokens=None):
    return plan_offloaded(SHAPES, PruneConfig(ratio=0.2, reconstruct="lstsq"),
                          None if limit is None else MemoryLimit(limit, "cgroup v1 memory.limit_in_bytes"),
                          tokens=8192, batch_tokens=1024, calibrating=True, held_tokens=held_tokens)


def test_spilling_is_decided_by_each_phase_s_peak():
    moments = 24 * 2 * 8 * 4864**2  # every layer's fit and held-out x xᵀ: 8.5 GiB
    assert not plan(64 * GiB).spill and plan(64 * GiB).peaks["refit"] > moments
    spilled = plan(4 * GiB)
    assert spilled.spill and max(spilled.peaks.values()) <= 0.8 * 4 * GiB
    # the 1024 held-out tokens are fewer than the width: the refit works on their rows
    assert spilled.peaks["refit"] == refit_peak(4864, 3891, 896, 1024) + 896 * 3891 * 4
    # on disk: the fit x xᵀ as a packed triangle, the 1024 held-out tokens' float32 rows (fewer than the width)
    assert spilled.stats_disk == 24 * (4864 * 4865 // 2 * 8 + 1024 * 4864 * 2) < moments / 1.8  # rows in 16 bits
    assert spilled.refits_disk == 24 * 896 * 3891 * 4
    assert spilled.disk_if_spilled == spilled.stats_disk  # each refit is smaller than the statistics it replaces
    assert plan(None).spill  # no limit known: spilled, as before the count


def test_a_cut_as_calibrated_spills_no_statistics_and_falls_back_when_it_does_not_fit(caplog):
    def cut(limit):
        return plan_offloaded(SHAPES, PruneConfig(ratio=0.2, reconstruct="lstsq"), MemoryLimit(limit, "test"),
                              tokens=8192, batch_tokens=1024, calibrating=True, cut_as_calibrated=True)

    roomy = cut(64 * GiB)
    assert roomy.cut_as_calibrated and not roomy.spill and roomy.stats_disk == 0 and set(roomy.peaks) == {
        "calibration", "rewrite"}
    assert roomy.disk_if_spilled == roomy.refits_disk == 24 * 896 * 3891 * 4  # the refits only
    one_refit = refit_peak(4864, 3891, 896, 1024)  # beside the layer's activations, inside its calibration
    held_everything = plan(64 * GiB).peaks["calibration"]  # every layer's second moments
    assert one_refit + 24 * 896 * 3891 * 8 < roomy.peaks["calibration"] < held_everything / 4
    tight_limit = int(roomy.peaks["calibration"] / 0.8) - 1  # the refits held in memory just do not fit...
    tight = cut(tight_limit)  # ...so they go to disk as they are made
    assert tight.cut_as_calibrated and tight.spill and max(tight.peaks.values()) <= 0.8 * tight_limit
    refit_after = plan(int(one_refit / 0.8) + 64 * MiB)  # fits one refit beside one refitted weight...
    assert not refit_after.cut_as_calibrated and refit_after.spill
    with caplog.at_level(logging.INFO, logger="glu_prune"):
        fallback = cut(int(one_refit / 0.8) + 64 * MiB)  # ...not beside the activations too: the plan that refits after
    assert fallback == refit_after
    assert "refitting each layer as it is calibrated needs" in caplog.text  # said, with what it needs


def test_a_phase_that_cannot_fit_even_spilled_is_refused_in_one_line_with_the_fix():
    needed = refit_peak(4864, 3891, 896)  # 8192 held-out tokens, more than the width: a held-out x xᵀ
    with pytest.raises(GluPruneError) as refused:
        plan(int(needed / 0.8) - 1, held_tokens=8192)
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
n, hidden, kept, rows = (int(a) for a in sys.argv[1:])
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
if rows:  # the held-out slice as calibration keeps it when it has fewer tokens than neurons: float32 rows
    held = torch.randn(rows, n, generator=g)
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
reconstruct_layer("lstsq", weight, torch.arange(kept), fit, held)
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("rows", [0, 512, 1024])  # 1024: more held-out rows than outputs, fewer than the width
def test_one_refit_stays_within_the_working_set_the_pre_flight_counts(tmp_path, rows):
    """SmolLM2's width, in a fresh process: the refit's peak above what was held before it (the raw
    second moments or the float32 held-out rows, counted by refit_peak too) stays within refit_peak,
    with a held-out second moment (rows 0) and with held-out rows."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak RSS")
    n, hidden, kept = 1536, 576, 1229
    done = subprocess.run([sys.executable, "-c", REFIT, str(n), str(hidden), str(kept), str(rows)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    grew = int(done.stdout.split()[-1])
    held_before = 8 * n * n + (4 * rows * n if rows else 8 * n * n)
    counted = refit_peak(n, kept, hidden, rows) - held_before
    print("measured", rows, grew, counted)
    assert 0.25 * counted < grew <= counted, (grew, counted)  # counted, and not grossly overcounted
@pytest.mark.parametrize("size", [1, 7, 1030])  # 1030: more than one strip of the symmetry check
def test_a_packed_second_moment_reads_back_bit_for_bit_in_half_the_bytes(tmp_path, size):
    from calibrate.moments import gram
    from calibrate.stats import LayerStats

    g = torch.Generator().manual_seed(size)
    stats = LayerStats.zeros(size, second_moment=True)
    stats.second_moment = gram(torch.randn(3 * size + 5, size, generator=g))
    stats.count = 3 * size + 5
    spilled = spill.SpilledLayers(tmp_path)
    spilled[0] = stats
    path = tmp_path / "layer-0.second_moment.bin"
    assert path.stat().st_size == spill.packed_bytes(size) == 8 * size * (size + 1) // 2 == spilled.written
    back = spilled[0].second_moment
    assert back.dtype == torch.float64 and torch.equal(back, stats.second_moment)
    lopsided = stats.second_moment.clone()
    lopsided[-1, 0] += 1.0  # not symmetric bit for bit: written whole, read back as it was
    spilled[1] = dataclasses_replace(stats, second_moment=lopsided)
    assert (tmp_path / "layer-1.second_moment.bin").stat().st_size == 8 * size * size
    assert torch.equal(spilled[1].second_moment, lopsided)


def dataclasses_replace(stats, **changes):
    import dataclasses

    return dataclasses.replace(stats, **changes)


def test_held_out_rows_spilled_give_the_refit_choice_made_in_memory(tmp_path):
    """A planted layer whose refit beats no refit (correlated neurons), 32 held-out rows for 48 neurons
    kept as activations: spilled (in 16 bits) and read back, they are the rows the refit scores in
    memory (:func:`calibrate.spill.half_rows`), so it chooses the same candidate, same weights."""
    from calibrate.moments import gram
    from calibrate.stats import LayerStats
    from pruning.registry import reconstruct_layer

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 48, generator=g)

    def rows(tokens):
        return torch.randn(tokens, 12, generator=g) @ mix + 0.05 * torch.randn(tokens, 48, generator=g)

    fit, x_held = LayerStats.zeros(48, second_moment=True), rows(32)
    fit.second_moment, fit.count = gram(rows(600)), 600
    held = LayerStats.zeros(48, second_moment=True, activations=True)
    held.activations, held.count = x_held, 32
    spilled_fit = spill.SpilledLayers(tmp_path / "fit")
    spilled_held = spill.SpilledLayers(tmp_path / "holdout", half=("activations",))
    spilled_fit[3], spilled_held[3] = fit, held
    assert (tmp_path / "holdout" / "layer-3.activations.bin").stat().st_size == 32 * 48 * 2  # float16
    back = spilled_held[3].activations
    assert back.dtype == torch.float32 and torch.equal(back, spill.half_rows(x_held).float())
    assert not torch.equal(back, x_held)  # float32 rows: rounded
    weight, keep = torch.randn(16, 48, generator=g), torch.arange(0, 48, 2)
    memory = reconstruct_layer("lstsq", weight, keep, fit, spill.half_rows(held.activations))
    disk = reconstruct_layer("lstsq", weight, keep, spilled_fit[3], spilled_held[3].activations)
    assert memory[2]["choice"] != "none"  # the planted refit wins: the comparison is not trivially none = none
    assert memory[2] == disk[2] and torch.equal(memory[0], disk[0])
