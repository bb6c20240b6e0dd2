"""benchmarks/studies/post_norm_refit.py: it measures the norm the model applies, on the tokens it sees, and
the first-order post-norm error that docs/post-norm.md derives holds."""

import torch

from benchmarks.studies.post_norm_refit import capture, layer_errors, post_norm, random_model, rms


def test_post_norm_is_the_models_post_feedforward_norm():
    for family in ("gemma2", "olmo2"):
        model = random_model(family, seed=0, norm_spread=0.5)
        z = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
        for index, block in enumerate(model.model.layers):
            mine = post_norm(model, index)
            assert mine.gain.std() > 0.1  # the spread gains, not the initial ones
            torch.testing.assert_close(mine(z), block.post_feedforward_layernorm(z), rtol=1e-5, atol=1e-6)


def test_capture_keeps_real_tokens_and_the_down_output():
    model = random_model("gemma2", seed=1, norm_spread=0.5)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    captured = capture(model, [{"input_ids": ids, "attention_mask": mask}], [0, 2])
    assert sorted(captured) == [0, 2]
    for index, (x, z) in captured.items():
        assert x.shape[0] == z.shape[0] == 13
        weight = model.model.layers[index].mlp.down_proj.weight.double()
        torch.testing.assert_close(z, x @ weight.T)


def test_first_order_post_norm_error():
    model = random_model("gemma3_text", seed=2, norm_spread=0.5)
    norm = post_norm(model, 0)
    z = 3 * torch.randn(6, model.config.hidden_size, dtype=torch.float64)
    e = 1e-5 * torch.randn_like(z)
    unit = z / z.norm(dim=1, keepdim=True)
    first = norm.gain * (e - unit * (unit * e).sum(1, keepdim=True)) / rms(z, norm.eps)[:, None]
    exact = norm(z + e) - norm(z)
    assert (exact - first).norm() < 1e-3 * first.norm()
    assert (exact - norm.gain * e / rms(z, norm.eps)[:, None]).norm() > 0.05 * first.norm()  # the projection counts


def test_layer_errors_rows():
    model = random_model("olmo2", seed=3, norm_spread=0.5)
    ids = torch.randint(3, 256, (32, 32), generator=torch.Generator().manual_seed(1))
    captured = capture(model, [{"input_ids": ids}], [1])
    rows = layer_errors(model, captured, ratio=0.5, steps=20)
    by = {(r["select"], r["refit"]): r for r in rows}
    assert len(by) == len(rows) == 7
    none, refit = by[("wanda", "none")], by[("wanda", "lstsq (pre-norm)")]
    assert refit["pre"] < none["pre"] and 0 < refit["post"] < none["post"]
