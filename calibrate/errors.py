"""The one exception type the CLI turns into a one-line message."""


class GluPruneError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, on one line."""
