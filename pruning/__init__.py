"""Deciding and cutting: scores, plans, surgery, reconstruction, saving, healing."""

from calibrate.models import load_pruned
from pruning.config import PruneConfig
from pruning.heal import HealConfig, heal
from pruning.prune import PruneResult, prune, prune_sequential
from pruning.registry import ALLOCATIONS, DEFAULT_METHOD, METHODS, RECONSTRUCTIONS
from pruning.save import save_pruned

__all__ = ["ALLOCATIONS", "DEFAULT_METHOD", "METHODS", "RECONSTRUCTIONS", "HealConfig", "PruneConfig", "PruneResult",
           "heal", "load_pruned", "prune", "prune_sequential", "save_pruned"]
