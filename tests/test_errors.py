"""Every bad input of docs/errors.md: a one-line error, a non-zero exit, no traceback, nothing written."""

import re

import pytest
from error_cases import CASES, cleanup_outputs, make_fixtures, run_case


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    make_fixtures(d)
    return d


@pytest.mark.parametrize("what,args", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error(fixtures, what, args):
    before = sorted(p.name for p in fixtures.iterdir())
    code, err = run_case(args, fixtures)
    assert code != 0
    lines = [line for line in err.splitlines() if not line.startswith("usage:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and re.match(r"glu-prune( \w+)?: error: ", lines[0]), lines[0]
    after = sorted(p.name for p in fixtures.iterdir())
    cleanup_outputs(fixtures)
    assert after == before, "a failed command left files behind"


def test_debug_shows_the_traceback(fixtures):
    from calibrate.errors import GluPruneError
    from pruning.cli import main

    with pytest.raises(GluPruneError):
        main(["--debug", "eval", "--model", str(fixtures / "missing"), "--corpus", str(fixtures / "c.txt")])
