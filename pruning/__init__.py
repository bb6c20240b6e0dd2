"""Deciding and cutting: scores, plans, surgery, saving."""

from pruning.pipeline import DEFAULT_METHOD, prune
from pruning.save import load_pruned, save_pruned

__all__ = ["DEFAULT_METHOD", "load_pruned", "prune", "save_pruned"]
