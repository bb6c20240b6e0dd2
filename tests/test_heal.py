import importlib
import itertools
import os
from types import SimpleNamespace

import pytest
import torch
from tiny import saved_manifest, tiny_model, tiny_tokenizer

from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.run import calibrate
from pruning import PruneConfig, prune
from pruning.heal import (
    CHECKPOINT,
    HealConfig,
    batch_for_step,
    distillation_loss,
    heal,
    learning_rate,
    load_checkpoint,
    training_batches,
)

heal_module = importlib.import_module("pruning.heal")  # the module: pruning.heal is also the function's name


def pruned_pair(seed=0, **overrides):
    teacher = tiny_model("llama", seed=seed, initializer_range=0.3)  # peaked outputs: pruning changes them
    student = tiny_model("llama", seed=seed, initializer_range=0.3, **overrides)
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(0))
    prune(student, calibrate(student, [{"input_ids": ids}]), PruneConfig(method="hybrid", ratio=0.5),
          inplace=True)
    return student, teacher


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 120, (2, 16), generator=g)} for _ in range(n)]


def test_loss_parts_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    loss, parts = distillation_loss(s, t, ids, mask, temperature=2.0, alpha=0.25)
    real = mask.bool()
    p_t = torch.softmax(t[real] / 2, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s[real] / 2, -1))).sum(-1).mean() * 4
    pairs = [(s[b, i], ids[b, i + 1]) for b in range(2) for i in range(4) if mask[b, i + 1]]
    ce = torch.stack([-torch.log_softmax(x, -1)[y] for x, y in pairs]).mean()
    torch.testing.assert_close(loss, 0.25 * kl + 0.75 * ce)
    assert distillation_loss(t, t, ids, mask, 2.0, 1.0)[1]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_schedule_and_batch_order_are_functions_of_the_step():
    config = HealConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(100, config) == pytest.approx(1e-4)
    data = list(range(5))
    epoch = [batch_for_step(data, s, seed=3) for s in range(5)]
    assert sorted(epoch) == data  # every batch once per epoch
    assert [batch_for_step(data, s, seed=3) for s in range(5)] == epoch


def test_healing_brings_the_student_closer_to_the_teacher():
    student, teacher = pruned_pair()
    data = batches()
    ids = data[0]["input_ids"]

    def kl():
        with torch.no_grad():
            return distillation_loss(student(ids).logits, teacher(ids).logits, ids, torch.ones_like(ids), 1.0,
                                     1.0)[1]["kl"]

    before = kl()
    config = HealConfig(steps=30, lr=3e-3, warmup_steps=2, alpha=1.0)
    healed, history = heal(student, teacher, data, config)
    assert healed is student and len(history) == 30
    assert kl() < 0.7 * before
    assert not any(p.requires_grad for p in healed.parameters())


@pytest.mark.parametrize("dropout,lora", [(0.0, None), (0.1, None), (0.1, 4)])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, dropout, lora):
    if lora:
        pytest.importorskip("peft")
    config = HealConfig(steps=7, lr=3e-3, warmup_steps=2, checkpoint_every=2, lora_rank=lora)
    straight, teacher = pruned_pair(attention_dropout=dropout)
    if dropout:
        ids = batches()[0]["input_ids"]
        straight.train()
        assert not torch.equal(straight(ids).logits, straight(ids).logits)  # the family honours the dropout
    heal(straight, teacher, batches(), config)

    interrupted, teacher = pruned_pair(attention_dropout=dropout)

    def stop(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(interrupted, teacher, batches(), config, checkpoint_dir=tmp_path, on_step=stop)
    resumed, teacher = pruned_pair(attention_dropout=dropout)
    steps_run = []
    _, history = heal(resumed, teacher, batches(), config, checkpoint_dir=tmp_path, resume=True,
                      on_step=lambda step, record: steps_run.append(step))
    assert steps_run == [5, 6, 7] and len(history) == 7  # resumed from the checkpoint of step 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(GluPruneError, match="other settings"):
        heal(resumed, teacher, batches(), HealConfig(steps=9, checkpoint_every=2, lora_rank=lora),
             checkpoint_dir=tmp_path, resume=True)


def test_healing_leaves_the_callers_random_state_alone():
    student, teacher = pruned_pair(attention_dropout=0.1)
    state = torch.random.get_rng_state()
    heal(student, teacher, batches(), HealConfig(steps=2, warmup_steps=1))
    assert torch.equal(torch.random.get_rng_state(), state)


class Trap:
    """Unpickling it makes a folder: a checkpoint holding it must be refused, not run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_hold_plain_tensors_only(tmp_path):
    config = HealConfig(steps=4, warmup_steps=1, checkpoint_every=2)
    student, teacher = pruned_pair(attention_dropout=0.1)
    heal(student, teacher, batches(), config, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 2 and state["rng"]["cpu"].dtype == torch.uint8
    trap = tmp_path / "trapped"
    torch.save({**state, "history": [Trap(trap)]}, tmp_path / CHECKPOINT)
    with pytest.raises(GluPruneError, match="cannot be read"):
        load_checkpoint(tmp_path, config)
    assert not trap.exists()


def test_lora_is_merged_back_into_a_plain_model():
    pytest.importorskip("peft")
    student, teacher = pruned_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    healed, _ = heal(student, teacher, batches(), HealConfig(steps=4, lr=1e-2, warmup_steps=1, lora_rank=4))
    assert type(healed).__name__ == "LlamaForCausalLM"
    assert set(healed.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in healed.state_dict().items())


def spy_on_lora(monkeypatch) -> dict:
    """Keep the PEFT model heal wraps the student in (``seen["peft"]``)."""
    seen, wrap = {}, heal_module.with_lora

    def kept(model, rank):
        seen["peft"] = wrap(model, rank)
        return seen["peft"]

    monkeypatch.setattr(heal_module, "with_lora", kept)
    return seen


def test_lora_merged_model_gives_the_peft_forward_and_the_base_weights_stay_frozen(monkeypatch):
    pytest.importorskip("peft")
    student, teacher = pruned_pair(dtype=torch.float64)  # float64: the merge's rounding is far below any fault
    ids = batches(n=1, seed=7)[0]["input_ids"]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with torch.no_grad():
        untrained = student(input_ids=ids).logits
    seen = spy_on_lora(monkeypatch)

    def after_the_last_step(step, record):  # trained, not merged yet
        if step == 4:
            peft = seen["peft"].eval()
            with torch.no_grad():
                seen["logits"] = peft(input_ids=ids).logits.clone()
            seen["base"] = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p.detach().clone()
                            for n, p in peft.named_parameters() if "lora_" not in n}
            seen["adapters"] = {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_" in n}
            peft.train()

    healed, _ = heal(student, teacher, batches(), HealConfig(steps=4, lr=1e-2, warmup_steps=1, lora_rank=4),
                     on_step=after_the_last_step)
    assert seen["base"].keys() == before.keys()
    for name, value in seen["base"].items():
        assert torch.equal(value, before[name]), f"{name} was trained: only the adapters may be"
    assert any(n.endswith("lora_B.default.weight") and v.abs().max() > 0 for n, v in seen["adapters"].items())
    with torch.no_grad():
        merged = healed(input_ids=ids).logits
    # W + s·B·A against x·Wᵀ + s·(x·Aᵀ)·Bᵀ differ by rounding only: measured 0.0 here in float64 (1.1e-5
    # in float32); the adapters' own effect on these logits is 2.1, so an unmerged adapter fails
    torch.testing.assert_close(merged, seen["logits"], rtol=0, atol=1e-10)
    assert (seen["logits"] - untrained).abs().max() > 1.0


def test_max_seconds_stops_at_the_step_whose_training_time_reaches_it(monkeypatch):
    ticks = itertools.count()  # a clock that advances one second per reading: each step takes exactly 1 s
    monkeypatch.setattr(heal_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    student, teacher = pruned_pair()
    _, history = heal(student, teacher, batches(), HealConfig(steps=10, warmup_steps=1, max_seconds=3.0))
    assert [(r["step"], r["seconds"]) for r in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not any(p.requires_grad for p in student.parameters())


def test_only_the_calibration_part_is_ever_trained_on(tmp_path):
    tokenizer = tiny_tokenizer()
    docs = [f"doc{i} " + ("abc" if i % 5 != 4 else "xyz") * 10 for i in range(20)]
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs))
    evaluation = load_corpus(str(path), part="evaluation")
    with pytest.raises(GluPruneError, match="calibration part only"):
        training_batches(tokenizer, evaluation, seq_len=16)
    with pytest.raises(GluPruneError, match="calibration part only"):
        training_batches(tokenizer, load_corpus(str(path), part="all"), seq_len=16)
    data = training_batches(tokenizer, load_corpus(str(path), part="calibration"), seq_len=16, batch_size=2)
    text = "".join(tokenizer.decode(row) for b in data for row in b["input_ids"]).replace(" ", "")
    assert "abcabc" in text and "xyz" not in text
    assert not any(t.replace(" ", "")[:5] in text for t in evaluation.texts)  # doc4, doc9, ...


def test_cli_heal_measures_saves_and_reloads(tmp_path):

    from transformers import AutoModelForCausalLM

    from glu_prune_cli.main import main

    teacher = tiny_model("llama", initializer_range=0.3)
    teacher.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "c.txt").write_text("\n\n".join(f"healing document {i} " * 6 for i in range(40)))
    (tmp_path / "other.txt").write_text("\n\n".join(f"another domain {i} " * 6 for i in range(40)))
    common = f"--corpus {tmp_path}/c.txt --seq-len 32 --batch-size 2".split()
    assert main(f"prune --model {tmp_path}/base --method hybrid --ratio 0.5 --out {tmp_path}/pruned".split()
                + common) in (0, None)
    heal_args = (f"heal --model {tmp_path}/pruned --teacher {tmp_path}/base --steps 6 --lr 3e-3 --alpha 1 "
                 f"--eval-corpora other={tmp_path}/other.txt --eval-tokens 64 --out {tmp_path}/healed").split()
    assert main(heal_args + common) in (0, None)
    manifest = saved_manifest(tmp_path / "healed")
    healing = manifest["healing"]
    assert manifest["method"] == "hybrid" and healing["steps"] == 6 and healing["part"] == "calibration"
    assert set(healing["perplexity_before"]) == {"c", "other"} == set(healing["perplexity_after"])
    assert "## Healing" in (tmp_path / "healed" / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "healed").config.intermediate_size == 32
    assert not (tmp_path / "healed.heal-checkpoint").exists()
    assert main(heal_args + common) == 2  # exists, no --force
    assert healing["config"]["warmup_steps"] == 0  # by default a tenth of the 6 steps
    assert main(heal_args + common + ["--warmup-steps", "3", "--force"]) in (0, None)
    assert saved_manifest(tmp_path / "healed")["healing"]["config"]["warmup_steps"] == 3  # as asked, not capped
