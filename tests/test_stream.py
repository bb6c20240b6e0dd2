import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, tiny_tokenizer, tiny_workspace

from calibrate.errors import GluPruneError
from calibrate.offload import offload_model
from calibrate.progress import showing
from calibrate.run import calibrate
from calibrate.stats import ActivationStats
from pruning import PruneConfig, prune
from pruning.save import load_pruned, save_pruned
from pruning.stream import Output, prune_checkpoint


def checkpoint(tmp_path, family):
    model = save_tiny(tmp_path / "m", family)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 120, (4, 16), generator=g)} for _ in range(4)]
    return model, calibrate(model, batches, second_moment=True, holdout=0.125)


def tensors(folder):
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.mark.parametrize("family,allocation,reconstruct", [
    ("llama", "uniform", "none"), ("phi3", "uniform", "lstsq"), ("qwen2", "global", "none"), ("llama", "owl", "lstsq")])
def test_streamed_pruning_writes_what_the_in_memory_path_saves(tmp_path, family, allocation, reconstruct):
    model, stats = checkpoint(tmp_path, family)
    config = PruneConfig(ratio=0.4, allocation=allocation, reconstruct=reconstruct)
    model = prune(model, stats, config).model
    save_pruned(model, tiny_tokenizer(), tmp_path / "memory")
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    with showing(False):
        record = prune_checkpoint(empty, loader, stats, config, Output(tmp_path / "streamed", tokenizer)).manifest
    record = record.to_dict()
    assert record["intermediate_sizes"] == model.config.glu_prune["intermediate_sizes"]
    assert record["kept_indices"] == model.config.glu_prune["kept_indices"]
    memory, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name in memory:
        torch.testing.assert_close(memory[name], streamed[name], rtol=0, atol=0)
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "streamed")(ids).logits, model(ids).logits)


def test_streamed_pruning_refuses_foreign_statistics_and_bias(tmp_path):
    _, stats = checkpoint(tmp_path, "llama")
    other = ActivationStats(stats.layers, stats.meta, identity=stats.identity * 1.1)
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    with pytest.raises(GluPruneError, match="another model"):
        prune_checkpoint(empty, loader, other, PruneConfig(ratio=0.4), Output(tmp_path / "o", tokenizer))
    with pytest.raises(GluPruneError, match="offloaded checkpoint"):
        prune_checkpoint(empty, loader, stats, PruneConfig(ratio=0.4, reconstruct="bias"), Output(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_prune_offload_equals_in_memory(tmp_path):
    from glu_prune_cli.main import main

    tiny_workspace(tmp_path)
    common = (f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --dtype float64 "
              "--method hybrid --ratio 0.25 --reconstruct lstsq").split()
    assert main(common + ["--out", str(tmp_path / "a")]) in (0, None)
    assert main(common + ["--offload", "--out", str(tmp_path / "b")]) in (0, None)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:  # the docs promise the same checkpoint: bit for bit, in the same dtype
        assert a[name].dtype == b[name].dtype == torch.float64 and torch.equal(a[name], b[name]), name


def test_small_output_shards_with_an_index(tmp_path):
    import json

    from pruning import stream

    model, stats = checkpoint(tmp_path, "llama")
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    original = stream.write_checkpoint

    def tiny_shards(*args, **kwargs):
        return original(*args, **kwargs, max_shard_bytes=20_000)

    stream.write_checkpoint = tiny_shards
    try:
        with showing(False):
            prune_checkpoint(empty, loader, stats, PruneConfig(ratio=0.4), Output(tmp_path / "s", tokenizer))
    finally:
        stream.write_checkpoint = original
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = prune(model, stats, PruneConfig(ratio=0.4)).model
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "s")(ids).logits, model(ids).logits)


def test_large_unchanged_tensors_are_copied_block_by_block_into_the_same_checkpoint(tmp_path, monkeypatch):
    from pruning import stream

    model, stats = checkpoint(tmp_path, "llama")
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    with showing(False):
        prune_checkpoint(empty, loader, stats, PruneConfig(ratio=0.4), Output(tmp_path / "whole", tokenizer))
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    copied = []
    original = stream.ShardWriter.add_blocks
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 100)  # smaller than the embedding table and attention
    monkeypatch.setattr(stream.ShardWriter, "add_blocks",
                        lambda self, name, *rest: copied.append(name) or original(self, name, *rest))
    with showing(False):
        prune_checkpoint(empty, loader, stats, PruneConfig(ratio=0.4), Output(tmp_path / "blocks", tokenizer))
    assert "model.embed_tokens.weight" in copied and not any("mlp" in name for name in copied)
    whole, blocks = tensors(tmp_path / "whole"), tensors(tmp_path / "blocks")
    assert whole.keys() == blocks.keys() and all(torch.equal(whole[k], blocks[k]) for k in whole)


def test_a_non_uniform_model_is_offloaded_and_pruned_again(tmp_path):
    """Per-layer sizes come from the config: the offloaded path reads a non-uniform model too."""
    model, stats = checkpoint(tmp_path, "llama")
    first = prune(model, stats, PruneConfig(ratio=0.3, allocation="owl")).model
    save_pruned(first, tiny_tokenizer(), tmp_path / "first")
    empty, loader, tokenizer = offload_model(str(tmp_path / "first"), torch.device("cpu"), torch.float32)
    with showing(False):
        record = prune_checkpoint(empty, loader, None, PruneConfig(ratio=0.5, method="ppm", allocation="global"),
                                  Output(tmp_path / "second", tokenizer)).manifest
    again = prune(load_pruned(tmp_path / "first"), None, PruneConfig(ratio=0.5, method="ppm", allocation="global"))
    assert record.intermediate_sizes == again.manifest.intermediate_sizes
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "second")(ids).logits, again.model(ids).logits)
