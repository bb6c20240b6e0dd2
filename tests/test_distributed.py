"""Two gloo processes on CPU give the statistics of one process."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import assert_same_stats, tiny_model

from calibrate import distributed
from calibrate.run import calibrate
from calibrate.stats import ActivationStats


def batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (10, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 10, 2)]


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model("gemma2", dtype=torch.float64)
        stats = calibrate(model, batches(), holdout=0.4, second_moment=True, progress=False)
        assert distributed.world_size() == world
        if distributed.is_main():
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    out = tmp_path / "stats.safetensors"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    together = ActivationStats.load(out)
    alone = calibrate(tiny_model("gemma2", dtype=torch.float64), batches(), holdout=0.4,
                                   second_moment=True, progress=False)
    assert together.tokens == alone.tokens == int(sum(b["attention_mask"].sum() for b in batches()[:3]))
    assert_same_stats(alone, together)
    for i in alone.layers:
        torch.testing.assert_close(alone.layers[i].second_moment, together.layers[i].second_moment, rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(alone.holdout[i].sum, together.holdout[i].sum, rtol=1e-9, atol=1e-12)
    assert "WORLD_SIZE" not in os.environ


def test_single_process_is_untouched():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert list(distributed.shard([1, 2, 3])) == [1, 2, 3]
    model = tiny_model("llama", dtype=torch.float64)
    assert calibrate(model, batches(), progress=False).tokens == 10 * 12 - 7
