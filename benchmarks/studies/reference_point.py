"""Issue 28's reference point: SmolLM2 at 20% from 1408 calibration tokens (with second moments and
the held-out eighth, as ``glu-prune calibrate --max-tokens 1408 --second-moment`` makes them): what
``--reconstruct auto`` decides, and what each layer of an ``lstsq`` refit chooses.

    python -m benchmarks.studies.reference_point   (GLU_DATA_DIR pointing at the corpora)
"""
import collections
import time

from calibrate.corpora import load_corpus
from calibrate.models import load_model
from calibrate.progress import showing
from pruning.config import PruneConfig
from pruning.decide import decide
from pruning.prune import prepare
from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches


def main() -> None:
    t = time.time()
    model, tok = load_model("smollm2-135m", dtype="float32")
    for name in ("wikitext2", "sms_spam"):
        corpus = load_corpus(name, part="calibration")
        batches = calibration_batches(tok, corpus, CalibrationSettings(max_tokens=1408))
        with showing(False):
            stats = calibrate_corpus(model, batches, {}, second_moment=True)
        print(name, "fit", stats.tokens, "held-out", next(iter(stats.holdout.values())).count, flush=True)
        print(" auto:", prepare(model, stats, PruneConfig(ratio=0.2, reconstruct="auto"))[1], flush=True)
        d = decide(model, stats, PruneConfig(ratio=0.2, reconstruct="lstsq"))
        print(" lstsq choices:", dict(collections.Counter(c["choice"] for c in d.choices.values())),
              "scored:", dict(collections.Counter(c["scored"] for c in d.choices.values())),
              f"{time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
