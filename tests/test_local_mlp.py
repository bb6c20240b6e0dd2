"""reconstruct mlp / lstsq-local (pruning.local_mlp): each kept MLP fitted layer by layer on the
pruned stream toward the dense model; never worse than the lstsq start on its rows, offloaded equal
to in memory, bad settings refused in one line."""

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, random_batches, tiny_model, tiny_tokenizer, tiny_workspace

from calibrate.errors import ConfigError, GluPruneError
from calibrate.offload import Offloaded, offload_model
from calibrate.progress import showing
from calibrate.run import split_holdout
from pruning import PruneConfig, prune_sequential
from pruning.local_mlp import Form, Rows, Settings, Weights, local_error, reconstruct_mlp
from pruning.prune import SequentialRun
from pruning.save import save_pruned
from pruning.stream import Output, prune_sequential_checkpoint


def config(reconstruct="mlp", **kw):
    return PruneConfig(ratio=0.25, reconstruct=reconstruct, schedule="sequential", **kw)


def held_out_loss(model, dense, batches) -> float:
    """The loss toward the dense model's predictions, KL(dense ‖ model) per token: on a random tiny
    model the text's own labels measure nothing (every model is near chance), the dense model's do."""
    total = 0.0
    with torch.no_grad():
        for b in batches:
            p = dense(input_ids=b["input_ids"]).logits.log_softmax(-1)
            q = model(input_ids=b["input_ids"]).logits.log_softmax(-1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(batches)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_beats_lstsq_on_every_family(family):
    batches, _ = random_batches(n_rows=64, seq=32, batch=8)
    lstsq = prune_sequential(tiny_model(family), batches, config("lstsq")).model
    result = prune_sequential(tiny_model(family), batches, config("mlp"))
    for layer, chosen in result.manifest.choices.items():
        local = chosen["local"]
        assert local["fit_error"] < local["fit_error_start"], (layer, local)  # start: the lstsq refit
        assert local["holdout_error"] <= local.get("start_error", local["adam_start_error"])
    held = split_holdout(batches, 0.125)[1]
    dense = tiny_model(family)
    assert held_out_loss(result.model, dense, held) < held_out_loss(lstsq, dense, held)


@pytest.mark.parametrize("target", ["mlp", "layer"])
def test_lstsq_local_is_the_closed_form_without_steps(target):
    batches, _ = random_batches(n_rows=64, seq=32, batch=8)
    result = prune_sequential(tiny_model("llama"), batches, config("lstsq-local", mlp_target=target))
    for chosen in result.manifest.choices.values():
        assert "best_step" not in chosen["local"] and chosen["local"]["closed_form"] in ("refitted", "kept start")
        assert chosen["local"]["holdout_error"] <= chosen["local"]["start_error"]


def test_closed_form_refuses_a_norm_after_the_mlp():
    batches, _ = random_batches(n_rows=32, seq=16, batch=8)
    with pytest.raises(GluPruneError, match="norm after the MLP"):
        prune_sequential(tiny_model("gemma2"), batches, config("lstsq-local", mlp_target="layer"))


def test_held_out_rows_decide_and_the_start_is_a_candidate():
    """A learning rate that wrecks the weights: every checkpoint is worse on held-out rows, so the start stays."""
    g = torch.Generator().manual_seed(0)
    w = Weights(*(torch.randn(s, generator=g) for s in ((6, 4), (6, 4), (4, 6))))
    form = Form(torch.nn.functional.silu)
    x = torch.randn(256, 4, generator=g)
    rows = Rows(x, (torch.nn.functional.silu(x @ w.gate.T) * (x @ w.up.T)) @ w.down.T)
    fit, held = Rows(rows.inputs[:200], rows.targets[:200]), Rows(rows.inputs[200:], rows.targets[200:])
    start = local_error(w, form, held)
    found, info = reconstruct_mlp(w, form, fit, held, Settings(steps=16, lr=10.0, batch=32, check_every=4))
    assert info["best_step"] == 0 and local_error(found, form, held) <= start


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_offloaded_equals_in_memory(tmp_path, family):
    tiny_workspace(tmp_path, family)
    batches, _ = random_batches(n_rows=32, seq=16, batch=8)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    memory = prune_sequential(model, batches, config("mlp", mlp_steps=8))
    save_pruned(memory.model, tiny_tokenizer(), tmp_path / "memory")
    empty, loader, tokenizer = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float32)
    run = SequentialRun(0.125, None, Offloaded(loader, torch.device("cpu")), {})
    with showing(False):
        streamed = prune_sequential_checkpoint(empty, run, batches, config("mlp", mlp_steps=8),
                                               Output(tmp_path / "streamed", tokenizer))
    assert streamed.manifest.to_dict()["kept_indices"] == memory.manifest.to_dict()["kept_indices"]
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "streamed" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("settings,option", [
    (dict(mlp_steps=0), "mlp_steps"), (dict(mlp_steps=-3), "mlp_steps"), (dict(mlp_steps=2.5), "mlp_steps"),
    (dict(mlp_lr=0.0), "mlp_lr"), (dict(mlp_lr=float("nan")), "mlp_lr"), (dict(mlp_target="dense"), "mlp_target")])
def test_bad_settings_are_refused_by_the_api(settings, option):
    with pytest.raises(ConfigError) as caught:
        config("mlp", **settings)
    assert caught.value.option == option and "\n" not in str(caught.value)


def test_mlp_needs_the_sequential_schedule():
    with pytest.raises(ConfigError, match="sequential"):
        PruneConfig(ratio=0.25, reconstruct="mlp")


@pytest.mark.parametrize("extra", [["--mlp-steps", "0"], ["--mlp-target", "dense"]])
def test_bad_settings_are_refused_by_the_cli_in_one_line(tmp_path, capsys, extra):
    from glu_prune_cli.main import main

    tiny_workspace(tmp_path)
    capsys.readouterr()  # the set-up's own output (transformers' save bar when run alone)
    code = main(["prune", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "c.txt"), "--sequential",
                 "--reconstruct", "mlp", "--ratio", "0.2", "--out", str(tmp_path / "p"), *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and extra[0] in err[0], err
    assert not (tmp_path / "p").exists()
