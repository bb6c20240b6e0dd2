"""The deployment benchmark's measuring functions on tiny models: what each timed call runs (forward
passes and tokens, counted), EOS handling, the table maths and the turn order; never a timing."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model, tiny_tokenizer, tiny_workspace

from benchmarks.deploy import engines
from benchmarks.deploy.engines import (
    LlamaCppEngine,
    TorchEngine,
    decode,
    first_token,
    generated_lengths,
    length_to_eos,
    measure_turn,
    median_figures,
    prompt_ids,
)
from benchmarks.deploy.report import add_ratios, engine_table
from benchmarks.deploy.run import SpeedSettings, Variant, round_robin
from benchmarks.deploy.variants import BuildSettings, check_build, model_specs
from calibrate.errors import ConfigError, GluPruneError
from glu_prune_cli.main import main

EOS = 2
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def counted(model) -> list[int]:
    """The number of tokens each forward call of ``model`` receives, appended as calls happen."""
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    return calls


def force_token(model, token: int, sign: float = 1.0) -> None:
    """Make ``token`` win (sign 1) or never win (sign -1) every greedy choice."""
    def shift(module, args, out):
        out = out.clone()
        out[..., token] += sign * 1e4
        return out

    model.lm_head.register_forward_hook(shift)


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, each from a full forward over everything so far."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_time_to_first_token_runs_the_prompt_once_and_yields_one_token():
    model = tiny_model()
    calls = counted(model)
    ids = prompt_ids(20, VOCAB)
    seconds, token = first_token(TorchEngine(model), ids)
    assert calls == [20]  # one forward over exactly the prompt, no generation
    assert token == greedy_without_cache(model, ids, 1)[0]
    assert seconds > 0


def test_decode_runs_one_token_per_step_through_the_cache():
    model = tiny_model()
    calls = counted(model)
    ids = prompt_ids(12, VOCAB)
    _, produced = decode(TorchEngine(model), ids, 6)
    assert calls == [12] + [1] * 6
    assert len(produced) == 6
    # the first token comes from the prefill; the steps produce the next six, as a cache-less model would
    assert produced == greedy_without_cache(model, ids, 7)[1:]


def test_decode_ignores_eos_and_produces_exactly_n_tokens():
    model = tiny_model()
    force_token(model, EOS)
    calls = counted(model)
    _, produced = decode(TorchEngine(model), prompt_ids(8, VOCAB), 9)
    assert produced == [EOS] * 9
    assert calls == [8] + [1] * 9


class Clock:
    """A fake perf_counter that an engine advances: 1 ms per prompt token, 10 ms per decode step."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeEngine:
    def __init__(self, clock):
        self.clock, self.prefills, self.steps = clock, [], 0

    def prefill(self, ids):
        self.prefills.append(len(ids))
        self.clock.now += 0.001 * len(ids)
        return EOS

    def step(self, token):
        self.steps += 1
        self.clock.now += 0.010
        return EOS


def test_measure_turn_turns_times_into_figures(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(engines.time, "perf_counter", clock)
    engine = FakeEngine(clock)
    figures = measure_turn(engine, {64: [5] * 64, 16: [5] * 16}, [5] * 32, 20, warmup_tokens=4)
    assert figures["prefill_tps"] == pytest.approx({16: 1000.0, 64: 1000.0})
    assert figures["ttft_ms"] == pytest.approx({16: 16.0, 64: 64.0})
    assert figures["decode_tps"] == pytest.approx(100.0)
    assert engine.prefills == [4, 16, 64, 32]  # warm-up, each prompt length once, the decode prompt
    assert engine.steps == 4 + 20


class FakeLlama:
    """What LlamaCppEngine uses of llama_cpp.Llama, recording what it is asked to evaluate."""

    def __init__(self):
        self.evaluated, self.resets, self.n_tokens = [], 0, 0

    def n_vocab(self):
        return 10

    def reset(self):
        self.resets += 1
        self.n_tokens = 0

    def eval(self, tokens):
        self.evaluated.append(list(tokens))
        self.n_tokens += len(tokens)


class FakeLogits(LlamaCppEngine):
    def last_logits(self):
        return np.eye(10)[self.llm.n_tokens % 10]  # the winning token is the position reached


def test_llama_cpp_engine_prefills_from_an_empty_cache_and_steps_one_token():
    llm = FakeLlama()
    engine = FakeLogits(llm)
    _, produced = decode(engine, [4, 5, 6], 3)
    assert llm.resets == 1 and llm.evaluated == [[4, 5, 6], [3], [4], [5]]
    assert produced == [4, 5, 6]
    first_token(engine, [1, 2])
    assert llm.resets == 2 and llm.n_tokens == 2


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_llama_cpp_and_transformers_decode_the_same_tokens(tmp_path):
    from llama_cpp import Llama

    from pruning.export_gguf import export_gguf

    model = tiny_model()
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "tiny.gguf", outtype="f32")
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    ids = prompt_ids(10, VOCAB)
    assert decode(LlamaCppEngine(llm), ids, 8)[1] == decode(TorchEngine(model), ids, 8)[1]


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}\n{% endfor %}"
    return tokenizer


@pytest.mark.parametrize("sign, expected", [(1.0, 1), (-1.0, 7)])
def test_generated_lengths_stop_at_eos_or_the_cap(sign, expected):
    model = tiny_model()
    model.generation_config.eos_token_id = EOS
    force_token(model, EOS, sign)  # EOS always first, or never
    lengths = generated_lengths(model, chat_tokenizer(), ["hello there", "a much longer message here"], 7,
                                batch_size=2)
    assert lengths == [expected, expected]


def test_length_to_eos_counts_the_eos():
    assert length_to_eos([5, 6, EOS, EOS], {EOS}) == 3
    assert length_to_eos([5, 6, 7], {EOS}) == 3
    assert length_to_eos([EOS], {0, EOS}) == 1


def test_prompt_ids_are_fixed_and_inside_the_vocabulary():
    ids = prompt_ids(500, 50)
    assert ids == prompt_ids(500, 50) and len(ids) == 500
    assert min(ids) >= 3 and max(ids) < 50
    assert prompt_ids(500, 50, seed=1) != ids


def test_median_of_turns_per_figure_and_length():
    turns = [{"prefill_tps": {8: v}, "decode_tps": 10 * v} for v in (3.0, 1.0, 2.0)]
    assert median_figures(turns) == {"prefill_tps": {8: 2.0}, "decode_tps": 20.0}


def row(model, engine="e", prefill=100.0, ttft=10.0, decode_tps=20.0, params=1000, layers=600, size=4000,
        peak=1500, kept=1.0):
    return {"model": model, "engine": engine, "ratio": None, "multiple_of": 1, "kept_fraction": kept,
            "params": params, "layer_params": layers, "size_bytes": size, "peak_bytes": peak, "floor_bytes": 500,
            "prefill_tps": {16: prefill}, "ttft_ms": {16: ttft}, "decode_tps": decode_tps}


def test_ratios_against_the_same_engines_base_and_the_parameter_prediction():
    rows = add_ratios([row("base"), row("p", prefill=150.0, ttft=8.0, decode_tps=25.0, params=800, layers=400,
                                        size=3200, peak=1300, kept=0.6),
                       row("base", engine="other", prefill=300.0)], 16)
    q = rows[1]["ratios"]
    assert q["prefill@16"] == pytest.approx(1.5)
    assert q["ttft"] == pytest.approx(1.25)  # 10 ms -> 8 ms: 1.25 times faster
    assert q["decode"] == pytest.approx(1.25)
    assert q["size"] == pytest.approx(0.8)
    assert q["peak"] == pytest.approx(0.8)  # (1300 - 500) / (1500 - 500): above the libraries' floor
    assert q["predicted_params"] == pytest.approx(1.25)
    assert q["predicted_layers"] == pytest.approx(1.5)
    assert rows[2]["ratios"]["prefill@16"] == 1.0  # its own engine's base, not the first engine's


def test_engine_table_shows_values_with_ratios_and_failures():
    rows = add_ratios([row("base"), row("p", prefill=150.0, kept=0.6),
                       {"model": "q", "engine": "e", "kept_fraction": 0.4, "error": "no q8_0 file"}], 16)
    table = engine_table(rows, [16], 16)
    assert "| p | 0.600 |" in table and "150 (1.50x)" in table
    base_line = next(line for line in table.splitlines() if line.startswith("| base |"))
    assert "(" not in base_line  # the base's figures carry no ratio to itself
    assert "not measured: no q8_0 file" in table


def test_round_robin_rotates_the_order_and_drops_a_failed_variant():
    order = []
    variants = [Variant(m, "e", "", {}) for m in "abc"]

    def measure(v):
        order.append(v.model)
        return {"error": "broken"} if v.model == "b" else {"decode_tps": 1.0, "prefill_tps": {}}

    turns = round_robin(variants, 3, measure)
    assert order == ["a", "b", "c", "c", "a", "c", "a"]  # b failed in round one and is not run again
    assert len(turns["a e"]) == 3 and turns["b e"] == [{"error": "broken"}]


def test_settings_and_targets_are_validated():
    with pytest.raises(ConfigError):
        SpeedSettings(prompt_lengths=())
    with pytest.raises(ConfigError):
        SpeedSettings(reps=0)
    with pytest.raises(ConfigError):
        model_specs([1.5], [1])
    assert [s.name for s in model_specs([0.2], [1, 64])] == ["base", "r20-m1", "r20-m64"]


def test_a_folder_built_with_other_settings_is_refused(tmp_path):
    check_build(tmp_path, BuildSettings("m", "sms_spam", 1024, "hybrid"))
    check_build(tmp_path, BuildSettings("m", "sms_spam", 1024, "hybrid"))  # the same: reused
    with pytest.raises(GluPruneError, match="calib_tokens"):
        check_build(tmp_path, BuildSettings("m", "sms_spam", 2048, "hybrid"))


def test_cli_measures_tiny_models_and_refuses_to_overwrite(tmp_path, capsys):
    tiny_workspace(tmp_path)
    engines = "hf-f32,gguf-f16" if HAS_LLAMA_CPP else "hf-f32"
    argv = ["speed", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "c.txt"), "--ratios", "0.5",
            "--multiple-of", "8", "--engines", engines, "--prompt-lengths", "8,16", "--decode-prompt", "8",
            "--new-tokens", "4", "--reps", "1", "--gen-prompts", "0", "--calib-tokens", "256",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(r["model"], r["engine"]): r for r in results["rows"]}
    assert set(rows) == {(m, e) for m in ("base", "r50-m8") for e in engines.split(",")}
    pruned = rows[("r50-m8", "hf-f32")]
    assert results["models"]["r50-m8"]["intermediate_sizes"] == [32] * 3
    assert pruned["kept_fraction"] == 0.5 and pruned["params"] < rows[("base", "hf-f32")]["params"]
    assert pruned["ratios"]["predicted_params"] > 1
    assert len(pruned["turns"]) == 1 and pruned["turns"][0]["decode_tps"] == pruned["decode_tps"]
    assert (tmp_path / "out" / "deploy_speed.png").stat().st_size > 0
    assert "| r50-m8 | 0.500 |" in (tmp_path / "out" / "results.md").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    if not HAS_LLAMA_CPP:  # a skip, so that CI refuses the shrunk check (tests/skip_policy.py)
        pytest.skip("llama-cpp-python is not installed: the gguf-f16 engine was not measured")


@pytest.mark.parametrize("args, message", [
    (["--ratios", "0.2,1.5"], "--ratio 1.5"),
    (["--multiple-of", "0"], "--multiple-of 0"),
    (["--engines", "hf-f32,onnx"], "unknown engine onnx"),
    (["--prompt-lengths", "128,0"], "--prompt-lengths"),
    (["--gen-prompts", "-1"], "--gen-prompts -1"),
])
def test_cli_refuses_bad_settings_in_one_line_before_loading_anything(tmp_path, capsys, args, message):
    assert main(["speed", "--model", str(tmp_path / "absent"), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
