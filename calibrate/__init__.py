"""Everything about running a model over text: models, corpora, batches, hooks, statistics, perplexity, tasks."""

from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.layerwise import calibrate_layerwise
from calibrate.models import load_model, load_pruned
from calibrate.perplexity import perplexity
from calibrate.progress import showing
from calibrate.run import calibrate
from calibrate.stats import ActivationStats
from calibrate.tasks import evaluate_task, load_task

__all__ = ["ActivationStats", "GluPruneError", "calibrate", "calibrate_layerwise", "evaluate_task", "load_corpus",
           "load_model", "load_pruned", "load_task", "make_batches", "perplexity", "showing"]
