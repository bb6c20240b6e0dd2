"""What the suite does with skips: every run ends with one line per skip and a count; under CI (the
``CI`` environment variable set, not to 0/false) a skip that :data:`EXPECTED_SKIPS` does not list
fails the run. tests/conftest.py imports these hooks; docs/testing.md explains the list."""

from __future__ import annotations

import os
import re

import pytest

# (test node id pattern, skip reason pattern, why a CPU-only CI machine skips it); patterns are re.search'ed.
EXPECTED_SKIPS = [
    (r"", r"^needs a CUDA GPU\b", "checks of CUDA itself: the CI machine has no GPU"),
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def expected_because(nodeid: str, reason: str) -> str | None:
    """Why this skip is expected on a CPU-only machine, or None when it is not."""
    for node_pattern, reason_pattern, why in EXPECTED_SKIPS:
        if re.search(node_pattern, nodeid) and re.search(reason_pattern, reason):
            return why
    return None


def sorted_skips(config) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """([(node id, reason, why)] expected, [(node id, reason)] unexpected) of the run so far."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    expected, unexpected = [], []
    for report in reporter.stats.get("skipped", []) if reporter else []:
        reason = skip_reason(report)
        why = expected_because(report.nodeid, reason)
        if why is None:
            unexpected.append((report.nodeid, reason))
        else:
            expected.append((report.nodeid, reason, why))
    return expected, unexpected


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _, unexpected = sorted_skips(session.config)
    if in_ci() and unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    expected, unexpected = sorted_skips(config)
    write = terminalreporter.write_line
    for nodeid, reason, why in expected:
        write(f"expected skip: {nodeid}: {reason} ({why})")
    for nodeid, reason in unexpected:
        write(f"unexpected skip: {nodeid}: {reason}")
    write(f"{len(expected) + len(unexpected)} skipped: {len(expected)} expected on a CPU-only machine, "
          f"{len(unexpected)} unexpected")
    if in_ci() and unexpected:
        write(f"CI refuses {len(unexpected)} unexpected skip(s): install what they name, or list an expected "
              "one in tests/skip_policy.py EXPECTED_SKIPS", red=True)
