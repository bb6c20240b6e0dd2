"""Two gloo processes on CPU give the statistics of one process: joined from the environment torchrun
sets (``init_from_env``), and through the CLI under ``python -m torch.distributed.run``."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import assert_same_stats, tiny_model, tiny_workspace

from calibrate import distributed
from calibrate.run import calibrate
from calibrate.stats import ActivationStats


def batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (10, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    return [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 10, 2)]


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    """A rank that joins the group as torchrun starts one: from the environment torchrun sets."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init_from_env("cpu")
    try:
        assert dist.get_backend() == "gloo"
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (rank, world, rank == 0)
        assert [b["input_ids"][0, 0] for b in distributed.shard(batches())] == [b["input_ids"][0, 0]
                                                                              for b in batches()[rank::world]]
        distributed.init_from_env("cpu")  # a second call joins nothing new
        model = tiny_model("gemma2", dtype=torch.float64)
        stats = calibrate(model, batches(), holdout=0.4, second_moment=True)
        if distributed.is_main():
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_joined_from_torchruns_environment_equal_one(tmp_path):
    out = tmp_path / "stats.safetensors"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    together = ActivationStats.load(out)
    alone = calibrate(tiny_model("gemma2", dtype=torch.float64), batches(), holdout=0.4,
                                   second_moment=True)
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
    assert calibrate(model, batches()).tokens == 10 * 12 - 7


def test_init_from_env_of_a_one_process_torchrun_stays_alone(monkeypatch):
    for name, value in zip(TORCHRUN_ENV, ("0", "1", "0", "127.0.0.1", str(free_port()))):
        monkeypatch.setenv(name, value)
    distributed.init_from_env("cpu")
    assert not dist.is_initialized() and distributed.world_size() == 1 and distributed.is_main()


def test_cli_calibrate_under_torchrun_equals_one_process(tmp_path):
    from glu_prune_cli.main import main

    tiny_workspace(tmp_path)
    args = (f"calibrate --model {tmp_path}/m --corpus {tmp_path}/c.txt --seq-len 32 --device cpu "
            "--dtype float64 --second-moment --out").split()
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), "-m", "glu_prune_cli.main", *args,
                           str(tmp_path / "two.safetensors")], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stdout
    assert main(args + [str(tmp_path / "one.safetensors")]) in (0, None)
    one, two = (ActivationStats.load(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    assert two.meta["processes"] == "2" and "processes" not in one.meta
    assert two.tokens == one.tokens
    assert_same_stats(one, two)
    for i in one.layers:
        torch.testing.assert_close(one.layers[i].second_moment, two.layers[i].second_moment, rtol=1e-9, atol=1e-12)
