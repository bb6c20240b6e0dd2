"""PruneConfig and the registry: validation once, in library terms; decisions that do not depend on the machine."""

import pytest
import torch
from tiny import saved_manifest, tiny_model, tiny_workspace

from calibrate import resources
from calibrate.errors import ConfigError, GluPruneError
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from pruning import ALLOCATIONS, METHODS, RECONSTRUCTIONS, PruneConfig, prune
from pruning.config import resolve_reconstruct
from pruning.decide import score_layer
from pruning.plan import top_k


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 120, (4, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("settings,option", [
    (dict(ratio=0.2, method="magic"), "method"), (dict(ratio=0.2, allocation="even"), "allocation"),
    (dict(ratio=0.2, reconstruct="exact"), "reconstruct"), (dict(ratio=0.2, allocation_spread=0.7),
                                                           "allocation_spread"),
    (dict(ratio=0.2, schedule="sequential", allocation="owl"), "allocation"),
    (dict(ratio=0.2, refit_target="dense"), "refit_target"),
    (dict(ratio=0.2, schedule="sequential", refit_target="dense", reconstruct="bias"), "refit_target"),
    (dict(ratio=0.2, method="obs", allocation="global"), "allocation"),
    (dict(ratio=1.2), "ratio"), (dict(), "target")])
def test_bad_settings_are_refused_once_naming_the_option(settings, option):
    with pytest.raises(ConfigError) as caught:
        PruneConfig(**settings)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}=")
    assert caught.value.as_flag().startswith(f"--{option.replace('_', '-')}")


def test_obs_with_global_allocation_is_refused_because_it_would_be_nearly_uniform():
    """obs scores are removal steps 0..I-1 in every layer: standardised per layer they are the same
    numbers everywhere, so a global ranking keeps about the same count per layer."""
    with pytest.raises(ConfigError, match="nearly uniform"):
        PruneConfig(ratio=0.4, method="obs", allocation="global")
    PruneConfig(ratio=0.4, method="obs", allocation="owl")


def test_the_registry_lists_what_each_entry_needs():
    assert {n for n, m in METHODS.items() if not m.data} == {"maw", "ppm", "l1", "l2", "vow", "random"}
    assert [n for n, a in ALLOCATIONS.items() if not a.streamable] == ["sensitivity", "sensitivity-sampled",
                                                                       "curve"]  # they measure on text
    assert {n for n, r in RECONSTRUCTIONS.items() if r.second_moment} == {"lstsq", "lstsq-centred", "lstsq-local",
                                                                           "mlp"}  # local ones start from lstsq
    assert {n for n, r in RECONSTRUCTIONS.items() if r.needs_text} == {"lstsq-local", "mlp"}
    assert PruneConfig(ratio=0.2, method="ppm").needs_stats is False
    assert PruneConfig(ratio=0.2, method="ppm", reconstruct="lstsq").needs_second_moment is True
    assert PruneConfig(ratio=0.2, allocation="sensitivity").needs_text is True


def test_reconstruct_auto_is_decided_by_the_model_never_by_free_memory(monkeypatch):
    config = PruneConfig(ratio=0.2, reconstruct="auto")
    small, why = resolve_reconstruct(config, [1536] * 30)
    assert small.reconstruct == "lstsq" and "auto: lstsq" in why
    monkeypatch.setattr(resources, "memory_limit", lambda: resources.MemoryLimit(1 << 20, "a test's limit"))
    assert resolve_reconstruct(config, [1536] * 30)[0].reconstruct == "lstsq"
    assert resolve_reconstruct(config, [65536])[0].reconstruct == "none"  # 32 GiB for one layer's x xᵀ
    assert resolve_reconstruct(config, [1536], has_second_moment=False)[0].reconstruct == "none"
    assert resolve_reconstruct(config, [1536], has_data=False) == (PruneConfig(ratio=0.2),
                                                                   "auto: none (no calibration data)")


def test_cli_prune_gives_the_same_model_under_a_memory_limit(tmp_path, monkeypatch):
    """The same command in a container with little memory (a faked cgroup v2 limit; the machine
    itself has plenty): offloaded (how), but the same refit and the same weights, bit for bit (what).
    glu-prune 0.1 chose reconstruct none here. The refit is asked for: at 1.2 fitting tokens per kept
    neuron ``auto`` now chooses none on purpose (pruning.config.REFIT_TOKENS_PER_COEFFICIENT)."""
    from safetensors.torch import load_file
    from tiny import fake_proc

    from glu_prune_cli.main import main

    tiny_workspace(tmp_path, intermediate_size=1024)
    command = (f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --dtype float64 "
               "--max-tokens 1024 --method hybrid --ratio 0.25 --reconstruct lstsq").split()
    assert main(command + ["--out", str(tmp_path / "roomy")]) == 0
    # every layer's second moments (48 MiB in float64) and a refit's buffers (55 MiB) do not fit in 80%
    # of 100 MiB; one layer's at a time, spilled, do (pruning.preflight counts each phase's peak)
    proc, _ = fake_proc(tmp_path / "root", limit=(100 << 20) + (1 << 20), usage=1 << 20)
    monkeypatch.setattr(resources, "PROC", proc)
    assert "cgroup v2 memory.max" in resources.memory_limit().source
    assert main(command + ["--out", str(tmp_path / "tight")]) == 0
    roomy, tight = (load_file(tmp_path / name / "model.safetensors") for name in ("roomy", "tight"))
    assert roomy.keys() == tight.keys()
    for name in roomy:
        assert roomy[name].dtype == tight[name].dtype == torch.float64 and torch.equal(roomy[name], tight[name]), name

    manifests = [saved_manifest(tmp_path / n) for n in ("roomy", "tight")]
    assert [m["reconstruct"] for m in manifests] == ["lstsq", "lstsq"]
    assert [m["run"]["offload"] for m in manifests] == [False, True]
    assert "would not fit in" in manifests[1]["run"]["why"] and "cgroup v2" in manifests[1]["run"]["why"]
    assert manifests[0]["kept_indices"] == manifests[1]["kept_indices"]


def test_statistics_of_the_same_checkpoint_in_another_dtype_are_accepted():
    """Calibrating in bfloat16 and pruning the float32 checkpoint is the same model; another seed is not."""
    bf16 = tiny_model("llama", dtype=torch.bfloat16)
    stats = calibrate(bf16, batches())
    stats.check_model(tiny_model("llama", dtype=torch.float32))
    stats.check_model(tiny_model("llama", dtype=torch.float16))
    with pytest.raises(GluPruneError, match="another model"):
        stats.check_model(tiny_model("llama", seed=1))
    config = PruneConfig(ratio=0.25)
    model = tiny_model("llama")
    # the float32 weights scored with the bfloat16 statistics; 64 neurons, a quarter removed: 48 kept
    expected = {g.index: top_k(score_layer(g, config, stats.layers[g.index]), 48).tolist() for g in glu_layers(model)}
    result = prune(model, stats, config)
    assert {i: keep.tolist() for i, keep in result.plan.items()} == expected
    assert [g.intermediate_size for g in glu_layers(result.model)] == [48] * len(expected)
    with pytest.raises(GluPruneError, match="another model"):
        prune(tiny_model("llama", seed=1), stats, config)


def test_statistics_identity_survives_saving(tmp_path):
    from calibrate.stats import ActivationStats

    stats = calibrate(tiny_model("llama", dtype=torch.bfloat16), batches())
    stats.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(tmp_path / "s.safetensors", model=tiny_model("llama"))
    assert torch.equal(loaded.identity, stats.identity)
    with pytest.raises(GluPruneError, match="another model"):
        ActivationStats.load(tmp_path / "s.safetensors", model=tiny_model("llama", seed=3))


def test_prune_copies_unless_asked_to_work_in_place():
    model = tiny_model("llama")
    stats = calibrate(model, batches())
    result = prune(model, stats, PruneConfig(ratio=0.25))
    assert model.config.intermediate_size == 64 and result.model.config.intermediate_size == 48
    assert result.model.config.glu_prune == result.manifest.to_dict()
    assert sorted(result.plan) == [0, 1, 2] and all(len(k) == 48 for k in result.plan.values())
    same = prune(model, stats, PruneConfig(ratio=0.25), inplace=True)
    assert same.model is model and model.config.intermediate_size == 48


def test_reconstruct_auto_asks_enough_fitting_tokens_per_kept_neuron():
    from pruning.config import REFIT_TOKENS_PER_COEFFICIENT, calibration_budget, refit_tokens

    config = PruneConfig(ratio=0.2, reconstruct="auto")  # keeps 1229 of 1536
    needed = refit_tokens(1229)
    assert needed == int(-(-REFIT_TOKENS_PER_COEFFICIENT * 1229 // 1))
    enough = resolve_reconstruct(config, [1536] * 30, True, fit_tokens=needed, hidden=576)
    assert enough[0].reconstruct == "lstsq"
    few, why = resolve_reconstruct(config, [1536] * 30, True, fit_tokens=1232, hidden=576)
    assert few.reconstruct == "none" and "1232 fitting tokens for 1229 kept neurons, 1.0 per coefficient" in why
    assert resolve_reconstruct(config, [1536], True, fit_tokens=10)[0].reconstruct == "lstsq"  # no sizes: as before
    assert calibration_budget(1229, None, 8192, 0.125) == (8192, "")  # the default is enough at this width
    raised, why = calibration_budget(7168, None, 8192, 0.125)
    assert raised * 0.875 >= refit_tokens(7168) and "raised from 8192" in why
    assert calibration_budget(7168, raised, 8192, 0.125) == (raised, "")
    refused, why = calibration_budget(7168, 8192, 8192, 0.125)
    assert refused is None and f"--max-tokens {raised}" in why


def test_prune_with_a_corpus_raises_the_budget_or_falls_back_to_no_refit(tmp_path, monkeypatch):
    from tiny import tiny_tokenizer

    from calibrate.corpora import load_corpus
    from calibrate.progress import showing
    from pruning import config as config_module
    from pruning.workflow import CalibrationSettings, prune_with_corpus

    model = tiny_model()
    (tmp_path / "c.txt").write_text("\n\n".join(f"calibration document {i} " * 6 for i in range(40)))
    corpus = load_corpus(str(tmp_path / "c.txt"), part="all")
    config = PruneConfig(ratio=0.25, reconstruct="auto")
    settings = CalibrationSettings(seq_len=32, batch_size=2)

    def run(settings):
        with showing(False):
            result = prune_with_corpus(model, tiny_tokenizer(), config, corpus=corpus, settings=settings)
        return result.manifest.to_dict()

    assert run(settings)["reconstruct"] == "lstsq"
    small = run(CalibrationSettings(seq_len=32, batch_size=2, max_tokens=64))
    assert small["reconstruct"] == "none" and "--max-tokens" in small["reconstruct_auto"]
    monkeypatch.setattr(config_module, "REFIT_TOKENS_PER_COEFFICIENT", 300.0)  # more than the corpus holds
    short = run(settings)
    assert "raised from 8192" in short["calibration_budget"]
    assert short["reconstruct"] == "none" and "fitting tokens" in short["reconstruct_auto"]
