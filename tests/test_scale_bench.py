"""The scale benchmark runs end to end on miniature shapes and prints positive ratios, its new
statistics equal to the old ones within the stated tolerance."""

import re

from benchmarks.studies.scale import bench as scale_bench
from calibrate.moments import MOMENT_TOLERANCE


def test_scale_bench_on_miniature_shapes(capsys):
    results = scale_bench.main(["--shapes", "tiny", "--tokens", "256", "--seq-len", "32", "--batch-size", "2",
                                "--vocab", "256"])
    out = capsys.readouterr().out
    ratios = [float(x) for x in re.findall(r"(\d+\.\d+)x", out)]
    assert len(ratios) == 8 and all(r > 0 for r in ratios)
    for label in ("calibration with x xᵀ ÷ plain forward: OLD", "refit ÷ calibration: OLD",
                  "total prune ÷ plain forward: OLD", "bytes spilled: OLD"):
        assert label in out
    tiny = results["tiny"]
    assert 0 <= tiny["difference"] <= MOMENT_TOLERANCE
    assert tiny["new_spilled"] > 0 and tiny["old_spilled"] > tiny["new_spilled"]  # packed, held-out slice as rows
    assert tiny["new_spilled"] == tiny["announced"]  # the folder measured = the bytes the pre-flight announces
    assert tiny["as_calibrated_spilled"] == 0  # each layer refitted as calibrated: no statistics written
