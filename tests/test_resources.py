"""The effective memory limit (machine, cgroup v1/v2, rlimits) and what it decides: how a run
is computed (in memory or offloaded), never which model comes out."""

import logging
import resource

import pytest
import torch
from tiny import fake_proc, save_tiny

from calibrate import resources
from calibrate.errors import GluPruneError
from calibrate.models import checkpoint_size
from calibrate.offload import should_offload
from calibrate.resources import MemoryLimit, check_memory, memory_limit

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def no_rlimits(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_limit_less_its_use_is_the_limit(tmp_path, no_rlimits, version):
    proc, group = fake_proc(tmp_path, version=version, limit=GiB, usage=300 * MiB, inactive=100 * MiB)
    limit = memory_limit(proc)
    assert limit.bytes == GiB - 200 * MiB  # inactive file cache is reclaimed before the kernel kills
    limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    assert f"cgroup {version} {limit_file} of 1.0 GiB" in limit.source and str(group) in limit.source
    assert limit.text.startswith("824.0 MiB (cgroup")


@pytest.mark.parametrize("version,unlimited", [("v2", "max"), ("v1", "9223372036854771712"), ("v2", None)])
def test_no_cgroup_limit_leaves_the_machine_s_memory(tmp_path, no_rlimits, version, unlimited):
    proc, _ = fake_proc(tmp_path, version=version, limit=unlimited, usage=GiB, available=3 * GiB)
    assert memory_limit(proc) == MemoryLimit(3 * GiB, "MemAvailable, the machine's available memory")


def test_the_smallest_limit_applies(tmp_path, no_rlimits):
    proc, _ = fake_proc(tmp_path, limit=8 * GiB, available=2 * GiB)
    assert memory_limit(proc).bytes == 2 * GiB
    proc, _ = fake_proc(tmp_path / "b", limit=GiB, available=2 * GiB)
    assert memory_limit(proc).bytes == GiB and "cgroup v2" in memory_limit(proc).source


def test_a_parent_group_s_limit_counts(tmp_path, no_rlimits):
    """Kubernetes limits the pod, and the container's own group says max."""
    proc, group = fake_proc(tmp_path, limit="max", cgroup="/pod/container")
    (group.parent / "memory.max").write_text(f"{512 * MiB}\n")
    (group.parent / "memory.current").write_text(f"{112 * MiB}\n")
    limit = memory_limit(proc)
    assert limit.bytes == 400 * MiB and str(group.parent) in limit.source


def test_a_container_s_v1_mount_root_is_its_own_group(tmp_path, no_rlimits):
    """Docker without a cgroup namespace: /proc/self/cgroup and the mount's root name the same group."""
    proc, group = fake_proc(tmp_path, version="v1", limit=GiB, cgroup="/docker/abc", mount_root="/docker/abc")
    assert group == tmp_path / "sys" / "fs" / "cgroup" / "memory"
    assert memory_limit(proc).bytes == GiB


def test_rlimits_less_what_the_process_holds(tmp_path, monkeypatch):
    proc, _ = fake_proc(tmp_path, limit="max")
    (proc / "self" / "status").write_text("Name: python\nVmSize:  524288 kB\nVmData:  102400 kB\n")
    limits = {resource.RLIMIT_AS: (2 * GiB, resource.RLIM_INFINITY),
              resource.RLIMIT_DATA: (4 * GiB, 4 * GiB)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits.get(which, (-1, -1)))
    limit = memory_limit(proc)
    assert limit.bytes == 2 * GiB - 512 * MiB and limit.source.startswith("RLIMIT_AS of 2.0 GiB, 512.0 MiB in use")
    limits[resource.RLIMIT_DATA] = (GiB, GiB)
    assert memory_limit(proc).bytes == GiB - 100 * MiB and memory_limit(proc).source.startswith("RLIMIT_DATA")


def test_this_machine_has_a_limit():
    limit = memory_limit()
    assert limit is not None and limit.bytes > 0 and limit.source


def test_refusals_name_the_limit(monkeypatch):
    monkeypatch.setattr(resources, "memory_limit", lambda: MemoryLimit(10 * MiB, "cgroup v2 memory.max of 10 MiB"))
    with pytest.raises(GluPruneError, match=r"only 10.0 MiB \(cgroup v2 memory.max of 10 MiB\) is available"):
        check_memory(9 * MiB)
    check_memory(7 * MiB)


def test_auto_offload_decides_from_the_effective_limit(tmp_path, monkeypatch, caplog):
    save_tiny(tmp_path / "m")
    model = str(tmp_path / "m")
    size = checkpoint_size(model, torch.float32)
    assert checkpoint_size(model, torch.float64) == 2 * size  # the weights as loaded, not as stored

    def limited(n):
        monkeypatch.setattr(resources, "memory_limit", lambda: MemoryLimit(n, "cgroup v1 memory.limit_in_bytes"))

    limited(10 * size)
    assert not should_offload(model) and "would fit in" in should_offload(model).why
    assert should_offload(model, asked=True).why == "asked (--offload)"
    limited(int(1.5 * size))  # float32 fits in 80%, float64 does not
    assert not should_offload(model, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="glu_prune"):
        choice = should_offload(model, dtype=torch.float64)
    assert choice and choice.note == {"run": {"offload": True, "why": choice.why}}
    assert "cgroup v1 memory.limit_in_bytes" in choice.why and "cgroup v1" in caplog.text
    limited(2 * size)  # the weights fit, with every layer's second moments (fit and held out) they do not
    assert not should_offload(model)
    choice = should_offload(model, second_moment=True)
    assert choice and "and its second moments (192.0 KiB) would not fit" in choice.why  # 2 x 3 layers x 64² x 8 B
    monkeypatch.setattr(resources, "memory_limit", lambda: None)
    assert should_offload(model).why == "no memory limit known"
    assert should_offload("HuggingFaceTB/SmolLM2-135M").why == "not a local checkpoint"


def test_spilled_statistics_equal_the_in_memory_ones(tmp_path):
    """An offloaded prune keeps each layer's x xᵀ in a file until the cut, not every layer's in memory."""
    from tiny import random_batches, tiny_model

    from calibrate.layerwise import Placement, calibrate_layerwise
    from calibrate.spill import SpilledLayers, half_rows

    model = tiny_model("llama")
    batches, _ = random_batches()
    options = dict(holdout=1 / len(batches), second_moment=True)  # the last batch held out
    memory = calibrate_layerwise(model, batches, **options)
    spilled = calibrate_layerwise(model, batches, placement=Placement(spill=tmp_path / "spill"), **options)
    assert isinstance(spilled.layers, SpilledLayers) and sorted(spilled.layers) == [0, 1, 2]
    # only the x xᵀ matrices go to disk, as raw float64 upper triangles: the per-neuron sums stay in memory
    assert sorted(p.name for p in (tmp_path / "spill" / "fit").iterdir()) == [
        f"layer-{i}.second_moment.bin" for i in range(3)]
    assert (tmp_path / "spill" / "fit" / "layer-0.second_moment.bin").stat().st_size == 8 * 64 * 65 // 2
    for mine, theirs in ((memory.layers, spilled.layers), (memory.holdout, spilled.holdout)):
        for i in mine:
            a, b = mine[i], theirs[i]
            if a.activations is not None:  # held-out rows: spilled in the 16 bits the refit scores them at
                assert torch.equal(half_rows(a.activations).float(), b.activations) and b.second_moment is None
            else:
                assert torch.equal(a.moment(), b.moment())
            assert a.count == b.count
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("sum", "abs_sum", "sq_sum", "max_abs"))
    assert spilled.layers[0] is not spilled.layers[0]  # read again on each access, held by no one
    assert spilled.meta["holdout_tokens"] == memory.meta["holdout_tokens"]


def test_layerwise_second_moments_are_checked_for_what_is_held(monkeypatch):
    """Without spill files every layer's x xᵀ (and its held-out one) is held until the file is written;
    a held-out slice of fewer tokens than neurons is held as its float32 rows instead."""
    from calibrate.layerwise import check_layerwise_memory

    one = 8 * 100 * 100  # a 100-neuron layer's float64 second moment
    monkeypatch.setattr(resources, "memory_limit", lambda: MemoryLimit(10 * one, "cgroup v2 memory.max"))
    check_layerwise_memory([100] * 12, 200, spilled=True)  # 2 matrices at a time: fits
    check_layerwise_memory([100] * 4, 200, spilled=False)  # 8 matrices: fits
    with pytest.raises(GluPruneError, match=r"prune --offload --corpus"):
        check_layerwise_memory([100] * 6, 200, spilled=False)  # 12 matrices: refused
    check_layerwise_memory([100] * 6, 50, spilled=False)  # 6 matrices and 6 half-size sets of rows: fits
    check_layerwise_memory([100] * 8, None, spilled=False)  # 8 matrices, no held-out slice: fits
    with pytest.raises(GluPruneError, match=r"prune --offload --corpus"):
        check_layerwise_memory([100] * 7, 50, spilled=False)  # 7 matrices and 7 half-size sets of rows: refused


def test_sequential_pruning_holds_one_layers_second_moments(monkeypatch):
    """Each layer's x xᵀ is released after its cut, so a limit that fits one layer's (fit and held-out)
    but not every layer's lets sequential calibration run; the cut still saw the second moments."""
    from tiny import INTERMEDIATE, LAYERS, tiny_model

    from calibrate.layerwise import Sequential, calibrate_layerwise

    one = 8 * INTERMEDIATE * INTERMEDIATE
    monkeypatch.setattr(resources, "memory_limit", lambda: MemoryLimit(3 * one, "cgroup v2 memory.max"))
    ids = torch.randint(3, 120, (4, 10), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])},
               {"input_ids": ids[2:], "attention_mask": torch.ones_like(ids[2:])}]
    seen = []
    stats = calibrate_layerwise(tiny_model(), batches, holdout=0.5, second_moment=True,
                                sequential=Sequential(lambda i, fit, held, _: seen.append(
                                    (fit.second_moment is not None, held.has_moment))))
    assert seen == [(True, True)] * LAYERS
    assert all(s.second_moment is None for s in list(stats.layers.values()) + list(stats.holdout.values()))
    with pytest.raises(GluPruneError, match="second moment"):  # held until written: refused
        calibrate_layerwise(tiny_model(), batches, holdout=0.5, second_moment=True)
