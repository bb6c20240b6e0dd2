"""calibrate.manifest.Manifest: every record glu-prune writes reads back as the same dict (so config.json
keeps its format), the typed fields readers take from it, and the name a model was loaded by."""

import json

from tiny import save_tiny, saved_manifest, stats_for, tiny_model

from calibrate.manifest import Manifest, read
from calibrate.models import load_model
from pruning.config import PruneConfig
from pruning.depth import DepthConfig, prune_depth
from pruning.prune import prune
from pruning.save import save_pruned


def records() -> dict[str, dict]:
    model = tiny_model("llama")
    width = prune(model, stats_for(model), PruneConfig(ratio=0.5, method="wanda", reconstruct="bias"))
    return {"width": width.manifest.to_dict(), "depth": prune_depth(model, DepthConfig((0,))).manifest.to_dict(),
            "depth after width": prune_depth(width.model, DepthConfig((1,))).manifest.to_dict()}


def test_every_record_reads_back_as_the_same_dict():
    for name, record in records().items():
        assert Manifest.from_dict(record).to_dict() == record, name


def test_the_typed_fields_are_the_records_entries():
    record = records()["depth after width"]
    manifest = Manifest.from_dict(record)
    assert (manifest.method, manifest.allocation, manifest.reconstruct) == ("wanda", "uniform", "bias")
    assert manifest.choices == record["reconstruct_choices"] and manifest.statistics == record["statistics"]
    assert manifest.removed_layers == [1] and manifest.intermediate_sizes == record["intermediate_sizes"]
    assert manifest.extra["kept_indices"] == record["kept_indices"] and "uniform" not in manifest.extra
    assert Manifest.from_dict(records()["depth"]).method is None
    assert Manifest([4, 4]).uniform and not Manifest([4, 3]).uniform
    assert manifest.updated(healing={"steps": 1}).healing == {"steps": 1}


def test_a_saved_model_carries_its_manifest_and_the_name_it_was_loaded_by(tmp_path):
    save_tiny(tmp_path / "base")
    model, tokenizer = load_model(str(tmp_path / "base"))
    assert "glu_prune_name" not in vars(model)  # nothing hung on the model object
    result = prune(model, stats_for(model), PruneConfig(ratio=0.5, method="wanda"))
    save_pruned(result.model, tokenizer, tmp_path / "pruned")
    assert saved_manifest(tmp_path / "pruned") == json.loads(json.dumps(result.manifest.to_dict()))
    assert read(result.model.config).base_model == str(tmp_path / "base")
