"""benchmarks/studies/task_neurons.py: the decision positions, the decision energy against the calibration
statistics, and the kept sets against what prune keeps."""

import torch
from tiny import tiny_model, tiny_tokenizer

from benchmarks.studies.task_neurons import decision_energy, decision_positions, kept_sets, layer_rows
from calibrate.run import calibrate
from pruning import PruneConfig, prune

DOC = "Each text below is labelled a, b.\n\nText: pear\nLabel: a\n\nText: stone\nLabel: b"


def test_decision_positions_are_the_colon_of_every_label():
    tokenizer = tiny_tokenizer()
    ids, positions = decision_positions(tokenizer, DOC)
    assert ids[0] == tokenizer.bos_token_id and len(positions) == 2

    def text(a, b):
        return "".join(tokenizer.convert_ids_to_tokens(ids[a:b]))

    assert [text(p - 5, p + 1) for p in positions] == ["Label:", "Label:"]
    assert [text(p + 1, p + 3) for p in positions] == [" a", " b"]


def squares(model, ids: list[int]) -> dict:
    """Per layer, the calibration sum of squares of the first tokens ``ids`` (one unpadded row)."""
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    return {i: layer.sq_sum for i, layer in calibrate(model, [batch]).layers.items()}


def test_decision_energy_is_the_calibration_sum_of_squares_at_those_positions():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids, _ = decision_positions(tokenizer, DOC)
    energy = decision_energy(model, [(ids, list(range(len(ids)))), (ids[:9], [3, 8])])
    whole, s3, s4, s8, s9 = (squares(model, ids[:n]) for n in (len(ids), 3, 4, 8, 9))
    for i in whole:  # causal: position p alone is (first p + 1 tokens) - (first p tokens)
        torch.testing.assert_close(energy[i], whole[i] + (s4[i] - s3[i]) + (s9[i] - s8[i]), rtol=1e-6, atol=1e-9)


def test_kept_sets_are_what_prune_keeps_and_rows_compare_them():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids, positions = decision_positions(tokenizer, DOC)
    stats = calibrate(model, [{"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}])
    sets = kept_sets(model, stats, "hybrid", 0.25)
    plan = prune(model, stats, PruneConfig(ratio=0.25, method="hybrid")).plan
    assert sets == {i: set(keep.tolist()) for i, keep in plan.items()}
    energy = decision_energy(model, [(ids, positions)])
    other = {i: set(range(len(s))) for i, s in sets.items()}  # the first neurons, as many
    rows = layer_rows(model, sets, other, energy)
    for row in rows:
        assert row["kept"] == 48 and 0 < row["overlap"] < 1 and 0 < row["decision_kept_b"] < 1
    same = layer_rows(model, sets, sets, energy)
    assert all(r["overlap"] == 1 and r["decision_kept_a"] == r["decision_kept_b"] for r in same)
