"""Under a real cgroup memory limit smaller than the model's weights and the libraries, the
default commands work one layer at a time and give the unlimited run's results, bit for bit."""

import json
import os

import pytest

from benchmarks.measures import Cgroup, evict
from benchmarks.studies.memory_limit import commands, float64_folder, identical, measured

LIMIT = 1200 << 20  # SmolLM2-135M in float64 is 1.08 GB of weights; the libraries take ~0.4 GB more


@pytest.mark.slow
def test_default_commands_finish_under_a_cgroup_limit_with_the_unlimited_results(tmp_path, data_dir):
    reason = Cgroup.unavailable()
    if reason:
        pytest.skip(reason)
    folder = float64_folder(tmp_path / "f64")
    env = {**os.environ, "GLU_PRUNE_CACHE": str(tmp_path / "cache")}
    runs = {}
    for kind, limit in (("free", None), ("tight", LIMIT)):
        (tmp_path / kind).mkdir()
        # 2048 tokens: two batches of 8 rows, one of them held out for the refit's ridge
        argv = commands(str(folder), "2048", ["--data-dir", str(data_dir)], tmp_path / kind)
        runs[kind] = {}
        for step in ("calibrate", "prune"):
            evict(folder)  # read by the run itself, so its group is charged for the pages
            runs[kind][step] = measured(argv[step], limit, env)
    assert all(run.code == 0 for run in runs["free"].values()), runs["free"]
    for step, run in runs["tight"].items():
        assert run.code == 0 and run.oom_kills == 0, (step, run.notes)
        assert any("would not fit in" in note and "cgroup" in note for note in run.notes), run.notes
    assert identical(tmp_path / "free" / "stats.safetensors", tmp_path / "tight" / "stats.safetensors")
    assert identical(tmp_path / "free" / "pruned", tmp_path / "tight" / "pruned")
    manifests = [json.loads((tmp_path / k / "pruned" / "config.json").read_text())["glu_prune"] for k in runs]
    assert [m["run"]["offload"] for m in manifests] == [False, True]
