"""Task scores from lm-evaluation-harness (the ``lm-eval`` extra), run on an in-memory model."""

from __future__ import annotations

from calibrate.errors import GluPruneError


def harness():
    try:
        import lm_eval
    except ImportError:
        raise GluPruneError("--lm-eval needs lm-evaluation-harness: pip install 'glu-prune[lm-eval]'") from None
    return lm_eval


def lm_eval_scores(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                   batch_size: int = 4) -> dict[str, float]:
    """``{"task/metric": value}`` for every task, through lm-eval's Python API (``simple_evaluate``).

    ``include_path`` adds a folder of task YAML files (e.g. local tasks when no hub is reachable);
    ``limit`` evaluates only the first N documents of each task.
    """
    lm_eval = harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise GluPruneError(f"lm-eval has no task '{unknown[0]}': check the name, or pass --lm-eval-include DIR "
                            f"with its YAML definition")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                                      verbosity="ERROR")["results"]
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and key != "sample_len":
                scores[f"{task}/{name}"] = float(value)
    return scores
