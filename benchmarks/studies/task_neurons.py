"""Which GLU neurons the few-shot task needs that raw-text calibration does not see (issue 20).

For two statistics files (e.g. raw ``sms_spam`` and task-formatted ``sms_spam:task``, both from
``glu-prune calibrate`` or a grid's ``stats/`` folder) it takes each layer's kept set under one
method and ratio (uniform allocation, as ``glu-prune prune`` keeps them), and reports per layer:

- ``overlap``: the share of kept neurons the two sets have in common;
- ``decision_kept``: for each set, the share of the layer's *decision energy* that it keeps. The
  decision energy of neuron j is ``(l2_j * ||down[:, j]||)^2``, where ``l2_j`` is the L2 norm of its
  activation at the positions where the model chooses a label (the ``:`` of every ``Label:``,
  shots included) in task-formatted documents that neither calibration saw (the last documents
  of the calibration part). It is the Wanda score measured only where the task is decided.
- ``top_missed``: of the 5% of neurons with the most decision energy, how many each set drops.

Run: ``python -m benchmarks.studies.task_neurons --a raw.safetensors --b task.safetensors --out out/task-neurons.json``.
"""

from __future__ import annotations

import argparse
import json

import torch

from calibrate.batches import with_bos
from calibrate.corpora import load_corpus
from calibrate.files import write_text
from calibrate.glu import glu_layers
from calibrate.hooks import HookOwner
from calibrate.models import load_model
from calibrate.stats import ActivationStats
from pruning.plan import Target, kept_count, top_k
from pruning.registry import score_neurons

DECISION = "\nLabel:"
TOP = 0.05


def kept_sets(model, stats: ActivationStats, method: str, ratio: float) -> dict[int, set[int]]:
    """Per layer, the neurons ``method`` keeps at ``ratio`` (uniform allocation)."""
    out = {}
    for layer in glu_layers(model):
        with torch.no_grad():
            scores = score_neurons(method, layer.gate_weight().cpu(), layer.up_weight().cpu(),
                                   layer.down_weight().cpu(), stats=stats.layers[layer.index], layer=layer.index)
        keep = kept_count(scores.numel(), model.config.hidden_size, Target(ratio=ratio))
        out[layer.index] = set(top_k(scores, keep).tolist())
    return out


def decision_positions(tokenizer, document: str) -> tuple[list[int], list[int]]:
    """Token ids (BOS first) of ``document`` and the positions of the last token of each ``Label:``."""
    encoded = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
    ids = with_bos(tokenizer, encoded["input_ids"])
    shift = len(ids) - len(encoded["input_ids"])
    ends, start = [], document.find(DECISION)
    while start >= 0:
        ends.append(start + len(DECISION))
        start = document.find(DECISION, start + 1)
    positions = [t + shift for t, (_, end) in enumerate(encoded["offset_mapping"]) if end in ends]
    return ids, positions


def decision_energy(model, sequences: list[tuple[list[int], list[int]]]) -> dict[int, torch.Tensor]:
    """Per layer, the sum over every (ids, positions) sequence's positions of each down_proj input
    neuron's squared activation (float64)."""
    layers = glu_layers(model)
    sums = {g.index: torch.zeros(g.intermediate_size, dtype=torch.float64) for g in layers}
    where: list[int] = []

    def record(index):
        def hook(module, args):
            sums[index] += args[0][0, where].double().square().sum(0).cpu()
        return hook

    with HookOwner() as owner, torch.no_grad():
        for g in layers:
            owner.pre_hook(g.down, record(g.index))
        for ids, positions in sequences:
            where[:] = positions
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device))
    return sums


def layer_rows(model, sets_a: dict[int, set[int]], sets_b: dict[int, set[int]],
               energy: dict[int, torch.Tensor]) -> list[dict]:
    rows = []
    for layer in glu_layers(model):
        i = layer.index
        weight = (energy[i] * layer.down_weight().detach().double().cpu().norm(dim=0).square()).tolist()
        total = sum(weight)
        top = set(sorted(range(len(weight)), key=lambda j: -weight[j])[: max(1, round(TOP * len(weight)))])
        a, b = sets_a[i], sets_b[i]
        rows.append({"layer": i, "kept": len(a), "overlap": len(a & b) / len(a),
                     "decision_kept_a": sum(weight[j] for j in a) / total,
                     "decision_kept_b": sum(weight[j] for j in b) / total,
                     "top_missed_a": len(top - a), "top_missed_b": len(top - b), "top": len(top)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--a", required=True, help="statistics file A (e.g. raw sms_spam)")
    p.add_argument("--b", required=True, help="statistics file B (e.g. sms_spam:task)")
    p.add_argument("--method", default="hybrid")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--documents", type=int, default=48, help="last task-formatted calibration documents scored")
    p.add_argument("--corpus", default="sms_spam:task")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    stats = {k: ActivationStats.load(path, model=model) for k, path in (("a", args.a), ("b", args.b))}
    documents = load_corpus(args.corpus, part="calibration", data_dir=args.data_dir).texts[-args.documents:]
    sequences = [decision_positions(tokenizer, d) for d in documents]
    energy = decision_energy(model, sequences)
    result = {"a": args.a, "b": args.b, "method": args.method, "documents": len(documents),
              "decision_positions": sum(len(p) for _, p in sequences), "ratios": {}}
    for ratio in (float(r) for r in args.ratios.split(",")):
        sets = {k: kept_sets(model, s, args.method, ratio) for k, s in stats.items()}
        result["ratios"][str(ratio)] = layer_rows(model, sets["a"], sets["b"], energy)
    write_text(args.out, json.dumps(result, indent=1))
    for ratio, rows in result["ratios"].items():
        print(f"ratio {ratio}: layer overlap decision_kept_a decision_kept_b top_missed_a top_missed_b (of top)")
        for r in rows:
            print(f"{r['layer']:3d} {r['overlap']:.3f} {r['decision_kept_a']:.4f} {r['decision_kept_b']:.4f} "
                  f"{r['top_missed_a']:3d} {r['top_missed_b']:3d} ({r['top']})")


if __name__ == "__main__":
    main()
