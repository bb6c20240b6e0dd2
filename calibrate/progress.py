"""Progress bars as one setting, not a parameter threaded through every call: :func:`showing`
sets it for a block (``with showing(False): ...``), :func:`shown` reads it, with each caller's
own default where it is unset, and :func:`bar` is tqdm under it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

_SHOWN: ContextVar[bool | None] = ContextVar("glu_prune_progress", default=None)


@contextmanager
def showing(flag: bool) -> Iterator[None]:
    """Show progress bars (``flag`` True) or not inside the block, whatever the callees' defaults."""
    token = _SHOWN.set(bool(flag))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def shown(default: bool = True) -> bool:
    """Whether progress bars are shown: the setting of the enclosing :func:`showing`, else ``default``."""
    value = _SHOWN.get()
    return default if value is None else value


def bar(iterable: Iterable, desc: str, unit: str, default: bool = True, **options) -> tqdm:
    """``tqdm(iterable)`` shown when :func:`shown` (``default`` where unset) says so."""
    return tqdm(iterable, desc=desc, unit=unit, disable=not shown(default), **options)
