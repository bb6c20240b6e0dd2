import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import FAMILIES, assert_same_stats, hooks_left, random_batches, tiny_model

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.hooks import recording
from calibrate.identity import fingerprint, weight_sample
from calibrate.resources import MemoryLimit, human_bytes
from calibrate.run import calibrate
from calibrate.stats import ActivationStats, LayerStats, merge, summary


def down_inputs(model, input_ids, layer):
    """The down_proj input of ``layer`` computed by hand from the MLP input."""
    captured = {}
    mlp = glu_layers(model)[layer].mlp
    handle = mlp.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids)
    handle.remove()
    x = captured["x"]
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn
    return (act(gate) * up).reshape(-1, gate.shape[-1]).double()


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_recorder_matches_hand_computed_activations(family):
    model = tiny_model(family, dtype=torch.float64)
    batches, ids = random_batches()
    stats = calibrate(model, batches, second_moment=True)
    x = down_inputs(model, ids, 1)
    s = stats.layers[1]
    assert s.count == ids.numel()
    torch.testing.assert_close(s.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(s.mean, x.mean(0))
    torch.testing.assert_close(s.rms, x.square().mean(0).sqrt())
    torch.testing.assert_close(s.l2, x.norm(dim=0))
    torch.testing.assert_close(s.variance, x.var(0, unbiased=False))
    torch.testing.assert_close(s.max_abs, x.abs().amax(0))
    torch.testing.assert_close(s.second_moment, x.T @ x)


def test_batch_size_and_order_do_not_matter():
    model = tiny_model("qwen3", dtype=torch.float64)
    _, ids = random_batches(16)
    runs = [calibrate(model, [{"input_ids": ids[i : i + bs]} for i in range(0, 16, bs)])
            for bs in (1, 4, 8)]
    reversed_order = calibrate(model, [{"input_ids": ids[i : i + 2]} for i in range(14, -1, -2)])
    for other in runs[1:] + [reversed_order]:
        assert_same_stats(runs[0], other)
    float32 = tiny_model("qwen3")
    a = calibrate(float32, [{"input_ids": ids}])
    b = calibrate(float32, [{"input_ids": ids[i : i + 1]} for i in range(16)])
    assert_same_stats(a, b, rel=1e-4)


def test_merge_of_halves_equals_the_whole():
    model = tiny_model("mistral", dtype=torch.float64)
    batches, _ = random_batches(16, batch=4)
    whole = calibrate(model, batches, second_moment=True)
    halves = merge(calibrate(model, batches[:2], second_moment=True),
                   calibrate(model, batches[2:], second_moment=True))
    assert_same_stats(whole, halves)
    torch.testing.assert_close(whole.layers[0].second_moment, halves.layers[0].second_moment)


def test_padding_never_counts():
    model = tiny_model("llama", dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (3, 9, 5, 12)]
    one_by_one = calibrate(model, [{"input_ids": r[None]} for r in rows])
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    padded = calibrate(model, [{"input_ids": ids, "attention_mask": mask}])
    assert padded.tokens == sum(len(r) for r in rows)
    assert_same_stats(one_by_one, padded)


def test_hooks_are_removed_after_errors_and_logits_unchanged():
    model = tiny_model("gemma")
    x = torch.randint(3, 120, (1, 8))
    with torch.no_grad():
        before = model(x).logits

    def failing(exc):
        yield {"input_ids": x}
        raise exc

    for exc in (RuntimeError("disk gone"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            calibrate(model, failing(exc))
        assert hooks_left(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_layer_subset_stops_after_the_last_recorded_layer():
    model = tiny_model("llama", num_hidden_layers=4)
    ran = []
    for i, layer in enumerate(glu_layers(model)):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    stats = calibrate(model, [{"input_ids": torch.randint(3, 120, (2, 6))}], layers=[0, 2])
    assert sorted(stats.layers) == [0, 2]
    assert 3 not in ran and 1 in ran


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_calibrates(family):
    model = tiny_model(family)
    stats = calibrate(model, [{"input_ids": torch.randint(3, 120, (2, 6))}])
    assert len(stats.layers) == 3 and stats.tokens == 12
    assert stats.meta["model_type"] == family and hooks_left(model) == 0


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama")
    stats = calibrate(model, [{"input_ids": torch.randint(3, 120, (2, 6))}], second_moment=True,
                      meta={"corpus": "c"})
    path = stats.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(path, model=model)
    assert_same_stats(stats, loaded, rel=0)
    assert torch.equal(loaded.layers[2].second_moment, stats.layers[2].second_moment)
    assert loaded.meta["fingerprint"] == fingerprint(*weight_sample(model)) and loaded.meta["corpus"] == "c"
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left
    with pytest.raises(GluPruneError, match="another model"):
        ActivationStats.load(path, model=tiny_model("llama", seed=1))
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GluPruneError, match="not a readable statistics file"):
        ActivationStats.load(truncated)
    newer = ActivationStats(stats.layers, {**stats.meta})
    newer.save(tmp_path / "n.safetensors")
    from safetensors.torch import load_file, save_file

    meta = ActivationStats.load(tmp_path / "n.safetensors").meta
    newer_file = tmp_path / "n.safetensors"
    save_file(load_file(newer_file), newer_file, metadata={**meta, "format_version": "99"})
    with pytest.raises(GluPruneError, match="newer"):
        ActivationStats.load(tmp_path / "n.safetensors")
    with pytest.raises(GluPruneError, match="does not exist"):
        ActivationStats.load(tmp_path / "missing.safetensors")
    text = summary(loaded)
    assert "tokens: 12" in text and "dead" in text and "corpus: c" in text


def test_stats_command_says_whether_second_moments_and_a_holdout_are_held(tmp_path, capsys):
    from glu_prune_cli.main import main

    model = tiny_model("llama")
    batches, _ = random_batches(n_rows=16, seq=6, batch=4)
    for second, holdout in ((False, 0.0), (True, 0.25)):
        stats = calibrate(model, batches, second_moment=second, holdout=holdout)
        path = stats.save(tmp_path / f"s-{second}.safetensors")
        assert main(["stats", str(path)]) == 0
        printed = capsys.readouterr().out
        size = glu_layers(model)[0].intermediate_size
        if not second:
            assert "second moments: none" in printed and "held-out slice: none" in printed
        else:
            held_tokens = next(iter(stats.holdout.values())).count
            assert 0 < held_tokens < 96 and held_tokens + stats.tokens == 96
            each = human_bytes(3 * size * size * 8)
            assert f"second moments: 3 of 3 layers, {each} (float64" in printed
            kept = human_bytes(3 * held_tokens * size * 4)  # fewer tokens than neurons: float32 activations
            assert (f"held-out slice: {held_tokens} tokens, 3 layers, second moments of 3 layers (3 as float32 "
                    f"activations, fewer tokens than neurons), {kept}") in printed
        assert f"file: {human_bytes(path.stat().st_size)}" in printed


def test_nonfinite_activations_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        glu_layers(model)[1].mlp.up_proj.weight.fill_(float("inf"))
    with pytest.raises(GluPruneError, match="layer 1 .*bfloat16"):
        calibrate(model, [{"input_ids": torch.randint(3, 120, (1, 6))}])


def test_empty_calibration_is_an_error_and_memory_is_checked(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="no tokens"):
        calibrate(model, [])
    monkeypatch.setattr("calibrate.resources.memory_limit", lambda: MemoryLimit(1000, "a test's limit"))
    with pytest.raises(GluPruneError, match="need .* but only"):
        calibrate(model, [{"input_ids": torch.randint(3, 120, (1, 6))}], second_moment=True)


def test_layer_stats_merge_rejects_mismatch():
    with pytest.raises(GluPruneError):
        LayerStats.zeros(4).merge(LayerStats.zeros(5))


def test_recording_context_is_clean_on_error():
    model = tiny_model("olmo2")
    with pytest.raises(ValueError):
        with recording(model):
            assert hooks_left(model) == 3
            raise ValueError
    assert hooks_left(model) == 0


def random_stats(seed: int, size: int = 5) -> ActivationStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(int(torch.randint(1, 20, (1,), generator=g)), size, generator=g, dtype=torch.float64)
    layer = LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0), x.T @ x)
    return ActivationStats({0: layer}, {"fingerprint": "f"})


@settings(max_examples=40, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6), c=st.integers(0, 10**6))
def test_merge_is_associative_and_commutative(a, b, c):
    x, y, z = random_stats(a), random_stats(b), random_stats(c)
    assert_same_stats(merge(x, y), merge(y, x), rel=1e-12)
    assert_same_stats(merge(merge(x, y), z), merge(x, merge(y, z)), rel=1e-12)
    torch.testing.assert_close(merge(merge(x, y), z).layers[0].second_moment,
                               merge(x, merge(y, z)).layers[0].second_moment)
