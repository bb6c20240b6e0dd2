"""Healing: distil a pruned model from its unpruned self on the calibration corpus.

The loss mixes the KL divergence from the teacher's softened distribution (temperature ``T``,
scaled by ``T²``) with the language-model loss: ``alpha · KL + (1 - alpha) · CE``. The teacher's
logits are computed on the fly. Training is deterministic for a seed: the batch order is a
function of the step and checkpoints keep the random state (dropout), so a run resumed from a
checkpoint ends with the weights of an uninterrupted one. The caller's random state is left as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibrate.batches import make_batches
from calibrate.errors import ConfigError, GluPruneError
from calibrate.files import atomic_file
from calibrate.progress import shown

CHECKPOINT = "heal-state.pt"


@dataclass
class HealConfig:
    """How to heal; ``steps`` optimiser steps of ``batch_size`` sequences."""

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    temperature: float = 2.0
    alpha: float = 0.5
    lora_rank: int | None = None
    gradient_checkpointing: bool = False
    autocast: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    max_seconds: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("steps", self.steps, "healing needs at least one step")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", self.alpha, "must be in [0, 1] (1: distillation only, 0: LM loss only)")
        for option in ("temperature", "lr"):
            if getattr(self, option) <= 0:
                raise ConfigError(option, getattr(self, option), "must be positive")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError("lora", self.lora_rank, "must be a positive rank")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      mask: torch.Tensor, temperature: float, alpha: float) -> tuple[torch.Tensor, dict]:
    """``alpha · T² · KL(teacher_T || student_T) + (1 - alpha) · CE(next token)``, averaged over the
    real tokens (``mask`` 1); returns the loss and its parts as floats."""
    t = temperature
    real = mask.bool()
    student_log = F.log_softmax(student_logits[real].float() / t, dim=-1)
    teacher_log = F.log_softmax(teacher_logits[real].float() / t, dim=-1)
    kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean") * t * t
    targets = real[:, 1:] & real[:, :-1]
    ce = F.cross_entropy(student_logits[:, :-1][targets].float(), input_ids[:, 1:][targets])
    loss = alpha * kl + (1 - alpha) * ce
    return loss, {"loss": loss.item(), "kl": kl.item(), "ce": ce.item()}


def learning_rate(step: int, config: HealConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to a tenth of ``lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_for_step(batches: list[dict], step: int, seed: int) -> dict:
    """The batch of ``step``: batches are shuffled afresh (by seed and epoch) every epoch."""
    epoch, position = divmod(step, len(batches))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return batches[int(order[position])]


def with_lora(model, rank: int):
    """Wrap ``model`` with LoRA adapters of ``rank`` on every linear layer of the decoder (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GluPruneError("--lora needs peft: pip install 'glu-prune[heal]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with the global CPU random state (and ``device``'s, on CUDA) seeded by ``seed``,
    and give the caller its own states back after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random states training draws from (dropout): the CPU's, and ``device``'s on CUDA."""
    state = {"cpu": torch.random.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.random.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(directory: Path, model, optimizer, step: int, history: list[dict], config: HealConfig,
                    device: torch.device) -> None:
    """Everything a resumed run needs (tensors and plain containers only), written to a temporary
    name and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / CHECKPOINT) as tmp:
        torch.save({"step": step, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                    "history": history, "config": asdict(config), "rng": rng_state(device)}, tmp)


def load_checkpoint(directory: Path, config: HealConfig) -> dict | None:
    """The checkpoint in ``directory`` (None if there is none), refused if it was made with other
    settings or holds anything but tensors and plain containers."""
    path = directory / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GluPruneError(f"checkpoint {path} cannot be read ({exc}): delete it or start without --resume") from None
    if "rng" not in state:
        raise GluPruneError(f"checkpoint {path} was written by an older glu-prune, without the random state a "
                            f"resumed run needs: delete it or start without --resume")
    saved = {k: v for k, v in state["config"].items() if k != "max_seconds"}
    if saved != {k: v for k, v in asdict(config).items() if k != "max_seconds"}:
        raise GluPruneError(f"checkpoint {path} was made with other settings ({saved}): use the same options, "
                            f"or delete it to start over")
    return state


def training_batches(tokenizer, corpus, seq_len: int = 256, batch_size: int = 4,
                     max_tokens: int | None = None) -> list[dict]:
    """Batches of ``corpus``'s calibration part; any other part is refused, so the evaluation part
    is never trained on."""
    if corpus.part != "calibration":
        raise GluPruneError(f"healing trains on the calibration part only, not '{corpus.part}': "
                            f"pass --part calibration")
    return make_batches(tokenizer, corpus, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)


def heal(student, teacher, batches: list[dict], config: HealConfig, checkpoint_dir: str | Path | None = None,
         resume: bool = False, on_step: Callable[[int, dict], None] | None = None):
    """Train ``student`` toward ``teacher`` on ``batches`` for ``config.steps`` steps; returns the
    (LoRA-merged) student and the loss history. ``on_step(step, record)`` runs after every step.

    The random state (LoRA initialisation, dropout) is seeded by ``config.seed``; the caller's comes back after.
    A progress bar unless :func:`calibrate.progress.showing` turns it off.
    """
    if not batches:
        raise GluPruneError("healing needs at least one batch of calibration text")
    device = next(student.parameters()).device
    with seeded(config.seed, device):
        return train(student, teacher, batches, config, device, checkpoint_dir, resume, on_step)


def train(student, teacher, batches: list[dict], config: HealConfig, device: torch.device,
          checkpoint_dir: str | Path | None, resume: bool,
          on_step: Callable[[int, dict], None] | None):
    """:func:`heal`'s training loop, under its random state (progress bar: :func:`calibrate.progress.shown`)."""
    teacher.eval().requires_grad_(False)
    student.requires_grad_(True)
    model = with_lora(student, config.lora_rank) if config.lora_rank else student
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start_step, history = 0, []
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is not None:
        state = load_checkpoint(directory, config)
        if state is not None:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for name, value in state["trainable"].items():
                    named[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], device)
            start_step, history = state["step"], state["history"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast)
    elapsed = history[-1]["seconds"] if history else 0.0  # training time only: callbacks and checkpoints excluded
    bar = tqdm(total=config.steps, initial=start_step, unit="step", desc="heal", disable=not shown())
    tokens_run = 0
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        batch = batch_for_step(batches, step, config.seed)
        input_ids = torch.as_tensor(batch["input_ids"]).to(device)
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(input_ids))).to(device)
        with torch.no_grad(), autocast:
            teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        with autocast:
            student_logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss, record = distillation_loss(student_logits, teacher_logits, input_ids, mask, config.temperature,
                                         config.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        elapsed += time.perf_counter() - started
        record.update(step=step + 1, tokens=int(mask.sum()), seconds=round(elapsed, 3))
        history.append(record)
        bar.update()
        tokens_run += record["tokens"]
        run_seconds = elapsed - (history[start_step - 1]["seconds"] if start_step else 0.0)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_run / max(run_seconds, 1e-9):.0f}")
        if on_step is not None:
            on_step(step + 1, record)
        if directory is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(directory, model, optimizer, step + 1, history, config, device)
        if config.max_seconds is not None and elapsed >= config.max_seconds:
            break
    bar.close()
    model.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if config.lora_rank:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, history
