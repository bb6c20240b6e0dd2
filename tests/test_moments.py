"""Second moments from float32 products (calibrate.moments): equal to float64 ones to the stated
tolerance on every family, batch-size invariant, additive across runs, padding excluded; small
held-out slices keep their activations."""

import pytest
import torch
from tiny import FAMILIES, random_batches, tiny_model

from calibrate import moments
from calibrate.glu import decoder, glu_layers
from calibrate.hooks import HookOwner, real_rows
from calibrate.layerwise import calibrate_layerwise
from calibrate.moments import MOMENT_TOLERANCE, add_gram_upper, exact_float32, gram, mirror_upper, strips
from calibrate.run import calibrate
from calibrate.spill import SpilledLayers
from calibrate.stats import ActivationStats, LayerStats, merge


@pytest.fixture(autouse=True)
def narrow_strips(monkeypatch):
    """Strips of 16 columns, so that the tiny models' 64 neurons take several."""
    monkeypatch.setattr(moments, "STRIP", 16)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def float64_moments(model, batches) -> dict[int, torch.Tensor]:
    """Every layer's sum x xᵀ over the real tokens, multiplied in float64 from the recorded rows."""
    rows: dict[int, list[torch.Tensor]] = {}
    mask = {}
    with HookOwner() as owned, torch.no_grad():
        for layer in glu_layers(model):
            owned.pre_hook(layer.down, lambda m, args, i=layer.index: rows.setdefault(i, []).append(
                real_rows(args[0], mask.get("m")).double()))
        for b in batches:
            mask["m"] = b.get("attention_mask")
            decoder(model)(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
    return {i: torch.cat(r).T @ torch.cat(r) for i, r in rows.items()}


def padded_batches():
    batches, _ = random_batches(16, batch=4)
    for b in batches:
        mask = torch.ones_like(b["input_ids"])
        mask[-1, 7:] = 0
        b["attention_mask"] = mask
    return batches


def test_strips_cover_the_width_and_the_gram_is_symmetric():
    assert strips(64) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert strips(70, 16)[-1][1] == 70 and strips(5, 16) == [(0, 5)]
    x = torch.randn(300, 70) * torch.linspace(0.1, 30, 70)
    s = gram(x)
    assert torch.equal(s, s.T)
    assert relative(s, x.double().T @ x.double()) < MOMENT_TOLERANCE


def test_blocks_and_order_do_not_matter_to_tolerance():
    x = torch.randn(500, 64)
    whole = gram(x)
    total = torch.zeros(64, 64, dtype=torch.float64)
    for part in reversed(x.split(37)):
        add_gram_upper(total, part, block=13)
    assert relative(mirror_upper(total), whole) < MOMENT_TOLERANCE


def test_tf32_is_off_inside_and_restored():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        with exact_float32():
            assert matmul.allow_tf32 is False
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_statistics_equal_float64_ones(family):
    model = tiny_model(family)
    batches = padded_batches()
    stats = calibrate(model, batches, second_moment=True)
    reference = float64_moments(model, batches)
    for i, s in stats.layers.items():
        assert s.second_moment.dtype == torch.float64 and torch.equal(s.second_moment, s.second_moment.T)
        assert relative(s.second_moment, reference[i]) < MOMENT_TOLERANCE
        torch.testing.assert_close(s.sq_sum, reference[i].diagonal(), rtol=1e-5, atol=1e-6)


def test_float32_moments_are_batch_size_invariant_and_exclude_padding():
    model = tiny_model("qwen3")
    _, ids = random_batches(16)
    runs = [calibrate(model, [{"input_ids": ids[i:i + bs]} for i in range(0, 16, bs)],
                      second_moment=True) for bs in (1, 4, 16)]
    padded = torch.cat([ids, torch.zeros(16, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(16, 12), torch.zeros(16, 5)], 1).long()
    runs.append(calibrate(model, [{"input_ids": padded, "attention_mask": mask}], second_moment=True))
    for other in runs[1:]:
        assert other.tokens == runs[0].tokens == ids.numel()
        for i in runs[0].layers:
            assert relative(other.layers[i].second_moment, runs[0].layers[i].second_moment) < MOMENT_TOLERANCE


def test_merge_of_two_runs_equals_one_run_over_both():
    model = tiny_model("gemma2")
    batches = padded_batches()
    whole = calibrate(model, batches, second_moment=True)
    halves = merge(calibrate(model, batches[:2], second_moment=True),
                   calibrate(model, batches[2:], second_moment=True))
    for i in whole.layers:
        assert halves.layers[i].count == whole.layers[i].count
        assert relative(halves.layers[i].second_moment, whole.layers[i].second_moment) < MOMENT_TOLERANCE


def test_a_small_held_out_slice_keeps_its_activations():
    model = tiny_model("llama")
    batches = padded_batches()  # the held-out batch: 3 × 12 + 7 = 43 tokens, fewer than the 64 neurons
    stats = calibrate(model, batches, second_moment=True, holdout=0.25)
    reference = float64_moments(model, batches[-1:])
    for i, held in stats.holdout.items():
        assert held.second_moment is None and held.activations.shape == (43, 64)
        assert held.activations.dtype == torch.float32 and held.count == 43
        assert relative(held.moment(), reference[i]) < MOMENT_TOLERANCE
        assert stats.layers[i].second_moment is not None and stats.layers[i].activations is None
    big = calibrate(model, batches, second_moment=True, holdout=0.5)  # 86 tokens: a matrix
    assert all(h.activations is None and h.second_moment is not None for h in big.holdout.values())
    layered = calibrate_layerwise(model, batches, holdout=0.25, second_moment=True)
    for i in stats.holdout:
        assert torch.equal(layered.holdout[i].activations, stats.holdout[i].activations)


def test_activations_merge_by_concatenation_and_fold_past_the_width():
    g = torch.Generator().manual_seed(0)

    def part(tokens):
        rows = torch.randn(tokens, 64, generator=g)
        s = LayerStats.zeros(64)
        s.count, s.activations = tokens, rows
        s.sum, s.sq_sum = rows.double().sum(0), rows.double().square().sum(0)
        return s

    a, b, c = part(20), part(30), part(40)
    ab = a.merge(b)
    assert ab.second_moment is None and torch.equal(ab.activations, torch.cat([a.activations, b.activations]))
    abc = ab.merge(c)  # 90 tokens > 64 neurons: the matrix
    assert abc.activations is None and abc.count == 90
    rows = torch.cat([a.activations, b.activations, c.activations]).double()
    assert relative(abc.second_moment, rows.T @ rows) < MOMENT_TOLERANCE
    assert relative(abc.merge(a).second_moment, abc.second_moment + a.moment()) < 1e-12
    with pytest.raises(Exception, match="with and without a second moment"):
        a.merge(LayerStats.zeros(64))


def test_activations_survive_save_load_and_spill(tmp_path):
    model = tiny_model("llama")
    stats = calibrate(model, padded_batches(), second_moment=True, holdout=0.25)
    loaded = ActivationStats.load(stats.save(tmp_path / "s.st"), model)
    assert stats.meta["format_version"] == "2"
    for i, held in stats.holdout.items():
        assert torch.equal(loaded.holdout[i].activations, held.activations)
        assert loaded.holdout[i].second_moment is None
    plain = calibrate(model, padded_batches(), second_moment=True)
    plain.save(tmp_path / "p.st")
    assert plain.meta["format_version"] == "1"  # nothing a reader of format 1 would miss
    spilled = SpilledLayers(tmp_path / "spill")
    spilled[0] = stats.holdout[0]
    assert torch.equal(spilled[0].activations, stats.holdout[0].activations)


def test_recorder_blocks_carry_over_batches_bit_for_bit_and_first_order_sums_are_float64(monkeypatch):
    """Blocks of 7 rows for x xᵀ (several per batch, and rows carried from one batch to the next):
    the sums do not depend on how the rows arrive, bit for bit; the first-order sums, 5 rows at a
    time through the buffers, equal float64 ones."""
    from calibrate import hooks
    from calibrate.hooks import Recorder, add_first_order

    monkeypatch.setattr(hooks, "MOMENT_BLOCK", 7)
    rows = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    runs = []
    for sizes in ((40,), (1,) * 40, (3, 11, 6, 20), (13, 27)):
        recorder = Recorder(0, 24, second_moment=True)
        for part in rows.split(list(sizes)):
            recorder.accumulate(part)
        runs.append(recorder.stats)
    for other in runs[1:]:
        assert torch.equal(other.second_moment, runs[0].second_moment) and other.count == 40
        assert relative(other.sum, runs[0].sum) < 1e-14 and torch.equal(other.max_abs, runs[0].max_abs)
    assert relative(runs[0].second_moment, rows.double().T @ rows.double()) < MOMENT_TOLERANCE
    exact = rows.double()
    s = LayerStats.zeros(24)
    add_first_order(s, rows, block=5)
    assert s.count == 40 and torch.equal(s.max_abs, exact.abs().amax(0))
    for got, want in ((s.sum, exact.sum(0)), (s.abs_sum, exact.abs().sum(0)), (s.sq_sum, exact.square().sum(0))):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
