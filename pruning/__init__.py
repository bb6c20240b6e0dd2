"""Deciding and cutting: scores, plans, surgery, reconstruction, saving, healing."""

from pruning.heal import HealConfig, heal
from pruning.pipeline import DEFAULT_METHOD, prune, prune_sequential
from pruning.save import load_pruned, save_pruned

__all__ = ["DEFAULT_METHOD", "HealConfig", "heal", "load_pruned", "prune", "prune_sequential", "save_pruned"]
