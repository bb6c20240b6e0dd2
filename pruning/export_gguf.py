"""Export a model, pruned or not, as a GGUF file that llama.cpp runs.

Each family is written the way llama.cpp's own converter lays it out: its llama.cpp architecture,
hyperparameter keys, tensor names (``gguf.TensorNameMap``) and weight conventions (rotary rows of
q/k in consecutive pairs for llama-style rope, Gemma's RMSNorm weights stored as ``1 + w``, Phi-3's
fused gate/up kept fused, Qwen2's q/k/v biases, Gemma 2 soft-capping, Granite multipliers, Gemma 3
layer types and sliding window).

Per-layer widths: llama.cpp reads ``{arch}.feed_forward_length`` as a per-layer array, but of the
families here only its ``deci`` architecture (a llama with per-layer sizes) builds each layer at
its own width; the other loaders use layer 0's width for every layer. A llama or mistral model
whose layers differ is therefore written as ``deci``; any other family with differing widths is
refused (prune it with the uniform allocation).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.files import atomic_file, check_output
from calibrate.glu import glu_layers, model_type, supported_families
from calibrate.manifest import read
from calibrate.models import resolve
from pruning.gguf_vocab import read_gguf_tokenizer, token_count, write_gguf_tokenizer, write_hf_tokenizer

log = logging.getLogger("glu_prune")
Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
# k-quants: the gguf package has no quantizer for them; llama.cpp's llama-quantize writes them
KQUANTS = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
           "q4_k": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k": "Q5_K_M", "q5_k_s": "Q5_K_S",
           "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
QK_K = 256  # a k-quant row is made of blocks of 256 values
NO_CAP = 1e6  # a soft-cap c * tanh(x / c) that leaves logits unchanged


@dataclass(frozen=True)
class Family:
    """How llama.cpp stores one Hugging Face family."""

    arch: gguf.MODEL_ARCH
    rope_pairs: bool = False  # llama.cpp rotates consecutive pairs: q/k rows are interleaved from HF's halves
    norm_shift: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w): the file stores 1 + w
    output: str = "optional"  # "optional": omitted when tied; "always" (OLMo 2); "tied": always token_embd
    varying_arch: gguf.MODEL_ARCH | None = None  # the llama.cpp architecture that builds per-layer widths
    q_scale_in: str | None = None  # where a query scale llama.cpp does not apply is folded in
    keys: Callable | None = None  # the family's own hyperparameter keys: keys(writer, config)


def gemma2_keys(writer: gguf.GGUFWriter, config) -> None:
    # llama.cpp's gemma2 always soft-caps; a cap of 1e6 is the identity to float32 precision
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping or NO_CAP)
    writer.add_final_logit_softcapping(config.final_logit_softcapping or NO_CAP)
    sliding_keys(writer, config)


def gemma3_keys(writer: gguf.GGUFWriter, config) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        raise GluPruneError("llama.cpp's gemma3 has no attention soft-capping but this model sets "
                            "attn_logit_softcapping: it cannot be exported to GGUF")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    sliding_keys(writer, config)
    writer.add_rope_freq_base_swa(rope_of(config, "sliding_attention")["rope_theta"])


def sliding_keys(writer: gguf.GGUFWriter, config) -> None:
    """Sliding-window size and which layers use it (Gemma 2 and 3)."""
    types = getattr(config, "layer_types", None)
    if config.sliding_window is None or (types is not None and "sliding_attention" not in types):
        return
    writer.add_sliding_window(config.sliding_window)
    if types is not None:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def phi3_keys(writer: gguf.GGUFWriter, config) -> None:
    writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                         or config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        log.info("llama.cpp runs phi3 without its sliding window (%d): outputs match only up to that length", window)
    writer.add_sliding_window(window or 0)


def granite_keys(writer: gguf.GGUFWriter, config) -> None:
    writer.add_logit_scale(config.logits_scaling)
    writer.add_residual_scale(config.residual_multiplier)
    writer.add_embedding_scale(config.embedding_multiplier)
    writer.add_attention_scale(config.attention_multiplier)


A = gguf.MODEL_ARCH
LLAMA = Family(A.LLAMA, rope_pairs=True, varying_arch=A.DECI)
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": Family(A.QWEN2),
    "qwen3": Family(A.QWEN3),
    "gemma": Family(A.GEMMA, norm_shift=1.0, output="tied"),
    "gemma2": Family(A.GEMMA2, norm_shift=1.0, output="tied", q_scale_in="q_proj", keys=gemma2_keys),
    "gemma3_text": Family(A.GEMMA3, norm_shift=1.0, q_scale_in="q_norm", keys=gemma3_keys),
    "phi3": Family(A.PHI3, keys=phi3_keys),
    "granite": Family(A.GRANITE, rope_pairs=True, keys=granite_keys),
    "olmo2": Family(A.OLMO2, output="always"),
}
# llama.cpp's own query scale where it differs from 1/sqrt(head_dim): (arch, layer count) of Gemma 27B
QUERY_SCALE_BY_WIDTH = {(A.GEMMA2, 46), (A.GEMMA3, 62)}


# ---- pure maths ---------------------------------------------------------------------------------

def interleave_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotate-half order (pairs i, i + d/2 in each head) to
    consecutive pairs (2i, 2i + 1), the order llama.cpp's normal rope rotates."""
    shape = weight.shape
    return weight.reshape(-1, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def llama3_rope_factors(params: dict, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp's ``rope_freqs``)."""
    base, factor = params["rope_theta"], params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < context / high, torch.ones_like(freqs), between)
    return torch.where(wavelen > context / low, torch.full_like(freqs, factor), out).float()


def query_scale_fold(config, arch: gguf.MODEL_ARCH) -> float:
    """What the queries must be multiplied by so that llama.cpp's attention scale gives Hugging
    Face's ``query_pre_attn_scalar ** -0.5`` (1.0 when they agree)."""
    head_dim = head_dim_of(config)
    wide = (arch, config.num_hidden_layers) in QUERY_SCALE_BY_WIDTH
    llama_cpp = (config.hidden_size / config.num_attention_heads if wide else head_dim) ** -0.5
    wanted = getattr(config, "query_pre_attn_scalar", None)
    return 1.0 if wanted is None else wanted ** -0.5 / llama_cpp


def width_note(sizes: list[int], block: int, qtype: str, fallback: str) -> str | None:
    """A note naming the layer widths that are no multiple of ``block`` (None when all are)."""
    odd = sorted({s for s in sizes if s % block})
    if not odd:
        return None
    return (f"layer widths {', '.join(map(str, odd[:6]))}{' ...' if len(odd) > 6 else ''} are not multiples of "
            f"{block}: their ffn_down rows cannot be {qtype} blocks, so {fallback}; prune with --multiple-of "
            f"{block} for {qtype} kernels in every layer")


# ---- configuration ------------------------------------------------------------------------------

def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_of(config, layer_type: str = "full_attention") -> dict:
    """The rope parameters (``rope_theta``, ``rope_type``, scaling) of one kind of layer."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers before 5
        if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
            return {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if layer_type in params or "full_attention" in params:
        params = params.get(layer_type) or params["full_attention"]
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def outtype_of(outtype: str, out: Path, sizes: list[int]) -> gguf.GGMLQuantizationType:
    """The storage type of ``outtype``; k-quants are refused with the llama-quantize command that makes them."""
    if outtype in KQUANTS:
        note = width_note(sizes, QK_K, KQUANTS[outtype], "llama-quantize stores those tensors in another type")
        if note:
            log.info(note)
        f16 = out.with_name(f"{out.stem}-f16{out.suffix or '.gguf'}")
        raise ConfigError("outtype", outtype, f"the gguf package cannot write k-quants: export --outtype f16 "
                                              f"--out {f16}, then run llama.cpp's "
                                              f"llama-quantize {f16} {out} {KQUANTS[outtype]}")
    if outtype not in OUTTYPES:
        raise ConfigError("outtype", outtype, f"choose one of {', '.join(OUTTYPES)} (k-quants: "
                                              f"llama-quantize on an f16 export)")
    return OUTTYPES[outtype]


def family_of(model) -> tuple[str, Family]:
    kind = model_type(model)
    if kind not in FAMILIES:
        raise GluPruneError(f"glu-prune cannot export the {kind} family to GGUF yet; exportable families: "
                            f"{', '.join(sorted(FAMILIES))} (supported for pruning: {supported_families()})")
    return kind, FAMILIES[kind]


def arch_for(kind: str, family: Family, sizes: list[int]) -> gguf.MODEL_ARCH:
    if len(set(sizes)) == 1:
        return family.arch
    if family.varying_arch is None:
        raise GluPruneError(f"llama.cpp builds every layer of a {kind} model at one width, and this model's "
                            f"widths differ ({min(sizes)}..{max(sizes)}): prune it with --allocation uniform to "
                            f"export it (llama and mistral models with per-layer widths export as deci)")
    return family.varying_arch


def check_config(kind: str, config) -> None:
    """Refuse what llama.cpp would run differently; note what it ignores."""
    rope = rope_of(config)
    allowed = {"default", "linear"} | ({"llama3"} if FAMILIES[kind].rope_pairs else set())
    if rope["rope_type"] not in allowed:
        raise GluPruneError(f"rope scaling '{rope['rope_type']}' of this {kind} model is not written by "
                            f"glu-prune export (it writes {', '.join(sorted(allowed))})")
    if FAMILIES[kind].rope_pairs and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise GluPruneError(f"llama.cpp's {kind} rotates whole heads, and this model rotates part of each: "
                            f"it cannot be exported to GGUF")
    window = getattr(config, "sliding_window", None)
    uses_window = kind == "mistral" or getattr(config, "use_sliding_window", False)
    if uses_window and window and window < config.max_position_embeddings:
        log.info("llama.cpp runs %s without its sliding window (%d): outputs match only up to that length",
                 kind, window)


# ---- tensors ------------------------------------------------------------------------------------

def gguf_tensors(model, kind: str, family: Family, arch: gguf.MODEL_ARCH) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for every weight of ``model``, in llama.cpp's conventions."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    head_dim = head_dim_of(config)
    q_scale = query_scale_fold(config, family.arch) if family.q_scale_in else 1.0
    scaled = (f"self_attn.{family.q_scale_in}.weight", f"self_attn.{family.q_scale_in}.bias")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    embed = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    for name, tensor in state.items():
        if name.endswith("inv_freq"):
            continue
        data = tensor.detach().to("cpu", torch.float32)
        if name.endswith("lm_head.weight"):
            if family.output == "tied":
                if not torch.equal(tensor, embed):
                    raise GluPruneError(f"llama.cpp's {kind} always ties the output to the embeddings, and this "
                                        f"model's lm_head differs: it cannot be exported to GGUF")
                continue
            if tied and family.output == "optional":
                continue
            yield "output.weight", data
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GluPruneError(f"tensor {name} has no llama.cpp name in the {gguf.MODEL_ARCH_NAMES[arch]} "
                                f"architecture: this {kind} model cannot be exported to GGUF")
        if family.norm_shift and name.endswith("norm.weight"):
            data = data + family.norm_shift
        if q_scale != 1.0 and name.endswith(scaled):
            data = data * q_scale
        if family.rope_pairs and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            data = interleave_rope_rows(data, head_dim)
        yield target, data
    if family.output == "always" and not any(k.endswith("lm_head.weight") for k in state):
        yield "output.weight", embed.detach().to("cpu", torch.float32)
    rope = rope_of(config)
    if rope["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(rope, head_dim)


def storage_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """How a tensor is stored: vectors and norms in f32 (llama.cpp's rule), a tensor whose rows
    the type's block does not divide in f16, every other one in ``qtype``."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    return Q.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def stored_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


# ---- metadata -----------------------------------------------------------------------------------

def write_hparams(writer: gguf.GGUFWriter, config, family: Family, sizes: list[int], n_vocab: int) -> None:
    heads = config.num_attention_heads
    head_dim = head_dim_of(config)
    rope = rope_of(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(sizes[0] if len(set(sizes)) == 1 else [int(s) for s in sizes])
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(n_vocab)
    if family.keys is not None:
        family.keys(writer, config)


def source_tokenizer(model, n_vocab: int) -> dict | None:
    """The tokenizer fields of the GGUF file ``model`` was loaded from (directly or as the base of a
    pruned model), when it lists the model's ``n_vocab`` tokens."""
    manifest = read(model.config)
    for name in (model.config.name_or_path, manifest.base_model if manifest else None):
        if not isinstance(name, str):
            continue
        try:
            kind, path = resolve(name)
        except GluPruneError:
            continue
        if kind == "gguf" and path is not None:
            fields = read_gguf_tokenizer(path)
            if token_count(fields) == n_vocab:
                return fields
    return None


def write_general(writer: gguf.GGUFWriter, model, qtype: Q) -> None:
    manifest = read(model.config)
    base = (manifest.base_model if manifest else None) or model.config.name_or_path
    if base:  # llama.cpp reads the name (e.g. 'phi3' selects token attributes): never a made-up one
        writer.add_name(f"{base} (glu-prune)" if manifest else str(base))
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if manifest:
        writer.add_string("glu_prune.manifest", json.dumps(manifest.to_dict(), sort_keys=True))


def export_gguf(model, tokenizer, out: str | Path, outtype: str = "f16", force: bool = False,
                source_gguf: Path | None = None) -> Path:
    """Write ``model`` (pruned or not) to the GGUF file ``out`` for llama.cpp; returns ``out``.

    ``outtype``: one of ``OUTTYPES`` (norms and vectors stay f32; a q8_0 tensor whose rows the
    block of 32 does not divide is stored f16). k-quants are refused with the ``llama-quantize``
    command that makes them from an f16 export. The tokenizer's fields are copied from
    ``source_gguf`` (by default the GGUF the model was loaded from, if any), else built from
    ``tokenizer``. The file is written whole or not at all; an existing ``out`` only with ``force``.
    """
    out = Path(out)
    sizes = [layer.intermediate_size for layer in glu_layers(model)]
    qtype = outtype_of(outtype, out, sizes)
    kind, family = family_of(model)
    arch = arch_for(kind, family, sizes)
    check_config(kind, model.config)
    check_output(out, force)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    source = read_gguf_tokenizer(Path(source_gguf)) if source_gguf is not None else source_tokenizer(model, n_vocab)
    if source_gguf is not None and token_count(source) != n_vocab:
        raise GluPruneError(f"{source_gguf} lists {token_count(source)} tokens but the model has {n_vocab} "
                            f"embedding rows: pass the GGUF the model came from")
    if source is None and tokenizer is None:
        raise GluPruneError("export needs the model's tokenizer (or the GGUF it came from) to write its vocabulary")

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    write_general(writer, model, qtype)
    write_hparams(writer, model.config, family, sizes, n_vocab)
    if source is not None:
        write_gguf_tokenizer(writer, source)
    else:
        write_hf_tokenizer(writer, tokenizer, n_vocab)
    fallback = 0
    for name, data in gguf_tensors(model, kind, family, arch):  # the layout first: the header precedes the data
        stored = storage_type(name, tuple(data.shape), qtype)
        fallback += stored != qtype and stored == Q.F16
        writer.add_tensor_info(name, tuple(data.shape), np.dtype(np.float32), stored_bytes(tuple(data.shape), stored),
                               raw_dtype=stored)
    if fallback:
        log.info(width_note(sizes, gguf.GGML_QUANT_SIZES[qtype][0], qtype.name.lower(), "they are stored as f16")
                 or f"{fallback} tensors whose rows {qtype.name} blocks cannot divide are stored as f16")
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, data in gguf_tensors(model, kind, family, arch):  # then one tensor at a time
                writer.write_tensor_data(gguf.quants.quantize(data.numpy(), storage_type(name, tuple(data.shape),
                                                                                          qtype)))
        finally:
            writer.close()
    return out
