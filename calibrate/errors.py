"""The project's exception types. The command line turns them into one-line messages."""

from __future__ import annotations


class GluPruneError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, on one line."""


class ConfigError(GluPruneError, ValueError):
    """A bad setting, named as the library names it (``option``, e.g. ``allocation_spread``).

    The command line shows the same problem under its flag (``--allocation-spread``).
    """

    def __init__(self, option: str, value, problem: str):
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option}={value!r}: {problem}")

    def as_flag(self) -> str:
        """The message with the option written as a command-line flag."""
        value = ",".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else self.value
        return f"--{self.option.replace('_', '-')} {value}: {self.problem}"
