"""Refit error after the post-feedforward RMSNorm (Gemma2, Gemma3, OLMo2), on a model with one.

These families normalise the MLP output before the residual: ``y = g ⊙ z / rms(z)`` with
``z = W x`` the down projection's output, so what reaches the residual stream is ``y``, not the
``z`` that the refit matches. For every decoder layer this captures ``x`` and ``z`` on random
tokens, keeps the neurons that a selection ranks highest (wanda, ``||x_j|| · ||W[:, j]||``, or its
post-norm form ``||x_j / rms(z)|| · ||g ⊙ W[:, j]||``), and compares on held-out tokens the error
before and after the norm of: no refit; the library's refit (``lstsq``, pre-norm, ridge from the
held-out slice); the same refit with every token weighted by ``1/rms(z_t)²`` (first order, the
post-norm error of a token is its pre-norm error scaled by ``g/rms(z_t)``, less its component along
``z_t``); and the post-norm optimum found by L-BFGS from the pre-norm refit (what any refit could
reach; wanda's selection only). Weighting output dimensions by ``g_j²`` is not a variant: rows of
``W'`` decouple, so it leaves the least-squares solution unchanged.

    python -m benchmarks.studies.post_norm_refit [--family gemma2] [--ratios 0.2,0.5] [--tokens 16384]
    python -m benchmarks.studies.post_norm_refit --model smollm2-135m --corpus wikitext2 --layers 0,10,20,29 --steps 0

The maths and the measured table (SmolLM2 with ``--tokens 8192``): docs/post-norm.md.

``--model`` takes a checkpoint instead of a random model, with ``--corpus`` its calibration text; a
family without the norm (e.g. Llama) gets a unit-gain RMSNorm after ``down_proj`` for the
measurement: what its token-to-token spread of ``rms(z)`` would do under such a norm.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from calibrate.corpora import load_corpus
from calibrate.glu import glu_layers, parse_layers
from calibrate.models import load_model
from calibrate.stats import LayerStats
from pruning.plan import top_k
from pruning.registry import reconstruct_layer
from pruning.workflow import CalibrationSettings, calibration_batches


def random_model(family: str, seed: int, norm_spread: float):
    """A small random model of ``family`` whose post-feedforward norm gains vary like a trained one's.

    Weights have standard deviation ``1/sqrt(hidden)``, which keeps signals near unit scale: with the
    default 0.02, OLMo2's MLP output (its input passes no norm) stays far below the norm's ``eps``,
    where the norm is a fixed scaling."""
    hidden = 64
    config = AutoConfig.for_model(family, vocab_size=256, hidden_size=hidden, intermediate_size=256,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  initializer_range=hidden ** -0.5)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    for block in model.model.layers:
        gain = block.post_feedforward_layernorm.weight
        with torch.no_grad():  # Gemma scales by 1 + weight, OLMo2 by weight
            spread = torch.exp(norm_spread * torch.randn(gain.shape, dtype=gain.dtype))
            gain.copy_(spread - 1 if family.startswith("gemma") else spread)
    return model


class PostNorm(torch.nn.Module):
    """``g ⊙ z / rms(z)`` in float64: a layer's post-feedforward norm (unit gain for a family without one)."""

    def __init__(self, gain: torch.Tensor, eps: float):
        super().__init__()
        self.gain, self.eps = gain, eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gain * z / rms(z, self.eps)[:, None]


def post_norm(model, index: int) -> PostNorm:
    """Layer ``index``'s post-feedforward norm in float64 (Gemma scales by ``1 + weight``, OLMo2 by ``weight``)."""
    norm = getattr(model.model.layers[index], "post_feedforward_layernorm", None)
    if norm is None:
        return PostNorm(torch.ones(model.config.hidden_size, dtype=torch.float64), 1e-6)
    gain = norm.weight.detach().double()
    return PostNorm(gain + 1 if model.config.model_type.startswith("gemma") else gain,
                    getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def capture(model, batches: list[dict], layers: list[int] | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(down_proj input x, output z) of the selected decoder layers on real tokens, tokens × features, float64."""
    seen: dict[int, tuple[list, list]] = {}
    handles = []
    for layer in glu_layers(model, layers):
        store = seen.setdefault(layer.index, ([], []))

        def record(module, args, out, store=store):
            real = mask.reshape(-1).bool()
            store[0].append(args[0].reshape(-1, args[0].shape[-1])[real].double())
            store[1].append(out.reshape(-1, out.shape[-1])[real].double())

        handles.append(layer.down.register_forward_hook(record))
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {i: (torch.cat(x), torch.cat(z)) for i, (x, z) in seen.items()}


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0), x.T @ x)


def rms(z: torch.Tensor, eps: float) -> torch.Tensor:
    return (z.square().mean(1) + eps).sqrt()


def post_norm_optimum(norm, weight: torch.Tensor, x_k: torch.Tensor, z: torch.Tensor, start: torch.Tensor,
                      steps: int) -> torch.Tensor:
    """``W'`` minimising ``mean_t ||norm(W' x_K) - norm(z)||²`` on these tokens, by L-BFGS from ``start``."""
    target = norm(z).detach()
    new = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([new], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                  tolerance_change=1e-15, history_size=20)

    def closure():
        optimiser.zero_grad()
        loss = (norm(x_k @ new.T) - target).square().sum(1).mean()
        loss.backward()
        return loss

    optimiser.step(closure)
    return new.detach()


SELECTIONS = ("wanda", "post-norm wanda")


def keep_of(selection: str, x: torch.Tensor, weight: torch.Tensor, norm: PostNorm, scale: torch.Tensor,
            size: int) -> torch.Tensor:
    """The ``size`` neurons ranked highest by wanda (``||x_j|| · ||W[:, j]||``) or by its post-norm form
    (``||x_j / rms(z)|| · ||g ⊙ W[:, j]||``), on these tokens."""
    if selection == "wanda":
        return top_k(x.norm(dim=0) * weight.norm(dim=0), size)
    return top_k((x / scale).norm(dim=0) * (norm.gain[:, None] * weight).norm(dim=0), size)


def layer_errors(model, captured, ratio: float, steps: int) -> list[dict]:
    """Per layer, selection and refit: held-out mean squared error before and after the norm, relative
    to the mean squared norm of the dense output there (``steps`` 0: no post-norm optimum)."""
    rows = []
    for layer in glu_layers(model, sorted(captured)):
        x, z = captured[layer.index]
        norm = post_norm(model, layer.index)
        cut = x.shape[0] * 7 // 8
        fit, held = slice(0, cut), slice(cut, None)
        weight = layer.down.weight.detach().double()
        scale = rms(z, norm.eps)[:, None]
        for selection in SELECTIONS:
            keep = keep_of(selection, x[fit], weight, norm, scale[fit], round(x.shape[1] * (1 - ratio)))
            refits = {
                "none": weight[:, keep],
                "lstsq (pre-norm)": reconstruct_layer("lstsq", weight, keep, stats_of(x[fit]), stats_of(x[held]))[0],
                "lstsq, tokens / rms(z)": reconstruct_layer("lstsq", weight, keep, stats_of((x / scale)[fit]),
                                                            stats_of((x / scale)[held]))[0],
            }
            if steps and selection == "wanda":
                with torch.enable_grad():
                    refits["post-norm optimum (L-BFGS)"] = post_norm_optimum(
                        norm, weight, x[fit][:, keep], z[fit], refits["lstsq (pre-norm)"], steps)
            with torch.no_grad():
                dense_post = norm(z[held])
                for name, new in refits.items():
                    out = x[held][:, keep] @ new.T
                    rows.append({"layer": layer.index, "select": selection, "refit": name,
                                 "pre": float((out - z[held]).square().sum(1).mean()
                                              / z[held].square().sum(1).mean()),
                                 "post": float((norm(out) - dense_post).square().sum(1).mean()
                                               / dense_post.square().sum(1).mean()),
                                 "rms_cv": float(scale.std() / scale.mean()),
                                 "rms_peak": float(scale.max() / scale.median()),
                                 "over_eps": float(z.square().mean() / norm.eps)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="gemma2", choices=["gemma2", "gemma3_text", "olmo2"])
    parser.add_argument("--model", default=None, help="a checkpoint or alias instead of a random model")
    parser.add_argument("--corpus", default="wikitext2", help="calibration text of --model (random models: "
                                                              "random tokens)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--layers", default=None, help="e.g. 0,10,20 (default: all)")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens, the last eighth held out")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--norm-spread", type=float, default=0.5, help="log-normal spread of the norm gains")
    parser.add_argument("--steps", type=int, default=200, help="L-BFGS iterations of the post-norm optimum")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model:
        model, tokenizer = load_model(args.model, device="cpu")
        model = model.double().eval()
        corpus = load_corpus(args.corpus, part="calibration", data_dir=args.data_dir)
        settings = CalibrationSettings(seq_len=args.seq_len, max_tokens=args.tokens)
        batches, source = calibration_batches(tokenizer, corpus, settings), f"{args.model} on {args.corpus}"
    else:
        model = random_model(args.family, args.seed, args.norm_spread)
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(3, model.config.vocab_size, (args.tokens // args.seq_len, args.seq_len),
                            generator=generator)
        batches, source = [{"input_ids": rows} for rows in ids.split(32)], f"random {args.family} on random tokens"
    captured = capture(model, batches, parse_layers(args.layers))
    tokens = next(iter(captured.values()))[0].shape[0]
    print(f"{source}: {tokens} tokens (last eighth held out); held-out squared error relative to the dense "
          f"output's, before / after the post-feedforward norm, per layer {','.join(map(str, sorted(captured)))}")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        rows = layer_errors(model, captured, ratio, args.steps)
        print(f"\nratio {ratio}")
        for key in dict.fromkeys((r["select"], r["refit"]) for r in rows):
            mine = [r for r in rows if (r["select"], r["refit"]) == key]
            per_layer = "  ".join(f"{r['pre']:.4f}/{r['post']:.4f}" for r in mine)
            mean = sum(r["post"] for r in mine) / len(mine)
            print(f"  {key[0]:15} {key[1]:28} {per_layer}   mean post {mean:.4f}")
        print("  rms(z) across tokens per layer, std/mean, max/median and mean rms(z)²/eps: "
              + "  ".join(f"{r['rms_cv']:.3f}, {r['rms_peak']:.1f}, {r['over_eps']:.3g}" for r in rows
                          if (r["select"], r["refit"]) == ("wanda", "none")))


if __name__ == "__main__":
    main()
