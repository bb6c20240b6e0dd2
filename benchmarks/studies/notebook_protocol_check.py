"""The notebooks' library calls at PROTOCOL.md's settings, against the README's figures (notebooks/README.md).

    GLU_DATA_DIR=../shared/data python -m benchmarks.studies.notebook_protocol_check

Prints static ``ppm`` at expansion 1.6x (notebook 1; README 4387.49) and WikiText-2-calibrated
``hybrid`` 20% (notebook 2; README 53.91) on WikiText-2: 8192 tokens in windows of 512, 8192
calibration tokens in rows of 128.
"""

from __future__ import annotations

from calibrate import calibrate, load_corpus, load_model, make_batches
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from pruning import PruneConfig, prune


def main() -> None:
    model, tok = load_model("smollm2-135m")
    test = load_corpus("wikitext2", part="evaluation")

    def ppl(m) -> float:
        return protocol_perplexity(m, tok, test, eval_tokens=8192, eval_docs=400, seq_len=512).perplexity

    static = prune(model, None, PruneConfig(expansion_ratio=1.6, method="ppm")).model
    print(f"static ppm at 1.6x on WikiText-2: {ppl(static):.4f}", flush=True)
    batches = make_batches(tok, load_corpus("wikitext2", part="calibration"), seq_len=128, max_tokens=8192)
    with showing(False):
        stats = calibrate(model, batches)
    hybrid = prune(model, stats, PruneConfig(ratio=0.2, method="hybrid")).model
    print(f"hybrid 20%, WikiText-2-calibrated, on WikiText-2: {ppl(hybrid):.4f}")


if __name__ == "__main__":
    main()
