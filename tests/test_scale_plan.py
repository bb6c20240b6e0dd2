"""benchmarks.studies.scale.plan: the 8B/70B plan's sizes against published counts and a real model and file."""

import math

from safetensors import safe_open
from tiny import random_batches, tiny_model

from benchmarks.studies.scale.plan import LLAMA_8B, LLAMA_70B, SMOLLM2_135M, Shape, fit_cubic, offload_peak_bytes
from calibrate.run import calibrate
from calibrate.stats import FIELDS


def test_parameter_counts_are_the_published_ones():
    # model cards / config-derived counts of SmolLM2-135M, Llama-3.1-8B and Llama-3.1-70B
    assert SMOLLM2_135M.params == 134_515_008
    assert LLAMA_8B.params == 8_030_261_248
    assert LLAMA_70B.params == 70_553_706_496


def test_a_tiny_llama_has_the_shapes_parameters_and_statistics_file_size(tmp_path):
    model = tiny_model("llama")
    c = model.config
    shape = Shape("tiny", c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size,
                  c.num_key_value_heads * c.head_dim, c.tie_word_embeddings)
    assert c.num_attention_heads * c.head_dim == c.hidden_size  # the shape's q/o are hidden × hidden
    assert shape.params == sum(p.numel() for p in model.parameters())
    batches, _ = random_batches(n_rows=16, seq=6, batch=4)
    for second in (False, True):
        stats = calibrate(model, batches, second_moment=second, holdout=0.25 if second else 0.0)
        path = stats.save(tmp_path / f"{second}.st")
        held = next(iter(stats.holdout.values())).count if second else None  # 24 tokens: kept as activations
        with safe_open(str(path), "pt") as f:  # the per-neuron sums and x xᵀ, not counts or the weight sample
            sums = sum(f.get_tensor(k).nbytes for k in f.keys()
                       if k.split(".")[-1] in (*FIELDS, "second_moment", "activations"))
        assert sums == shape.stats_file_bytes(second, held) and path.stat().st_size > sums


def test_fit_cubic_recovers_the_law_and_a_free_exponent():
    sizes = [1000, 2000, 4000]
    law = fit_cubic(sizes, [3e-10 * n**3 for n in sizes])
    assert math.isclose(law.coefficient, 3e-10, rel_tol=1e-12) and math.isclose(law.exponent, 3, rel_tol=1e-12)
    assert math.isclose(law(8000), 3e-10 * 8000**3, rel_tol=1e-12)
    assert math.isclose(law.free(8000), law(8000), rel_tol=1e-9)
    faster = fit_cubic(sizes, [1e-6 * n**2.5 for n in sizes])  # speed rising with the size
    assert math.isclose(faster.exponent, 2.5, rel_tol=1e-12)
    assert math.isclose(faster(4000), 1e-6 * 4000**2.5, rel_tol=1e-12)  # the cubic through the largest point
    assert faster.free(8000) < faster(8000) and math.isclose(faster.free(8000), 1e-6 * 8000**2.5, rel_tol=1e-9)
    assert math.isnan(fit_cubic([1000], [1.0]).exponent)


def test_offload_peak_adds_its_parts_and_a_refit_adds_the_moments():
    without = offload_peak_bytes(LLAMA_8B, 65536, 2, 1024, 4.0, 0.2, refit=False)
    with_refit = offload_peak_bytes(LLAMA_8B, 65536, 2, 1024, 4.0, 0.2, refit=True)
    for parts in (without, with_refit):
        assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert with_refit["total"] - without["total"] == (6 * LLAMA_8B.moment_bytes
                                                      + LLAMA_8B.refitted_down_bytes(0.2))
    assert without["hidden states"] == 65536 * 4096 * 2 and LLAMA_8B.moment_bytes == 14336**2 * 8
