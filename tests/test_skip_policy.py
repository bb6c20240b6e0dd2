"""tests/skip_policy.py: under CI an unexpected skip fails the run and an expected one is listed;
elsewhere every skip is listed and counted; under CI missing corpora stop the run at its start."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PLANTED = '''
import pytest

def test_passes():
    assert True

def test_needs_a_library():
    pytest.skip("the planted library is not installed")

@pytest.mark.skipif(True, reason="needs a CUDA GPU")
def test_on_cuda():
    assert False
'''


def run_pytest(folder: Path, args: list[str], ci: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # no plugin needed: a faster start
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def planted(tmp_path: Path, skips: bool = True) -> Path:
    text = PLANTED if skips else PLANTED.replace('pytest.skip("the planted library is not installed")', "pass")
    (tmp_path / "test_planted.py").write_text(text)
    return tmp_path


def test_ci_fails_on_an_unexpected_skip_and_names_it(tmp_path):
    code, out = run_pytest(planted(tmp_path), ["-p", "skip_policy", "test_planted.py"], ci="true")
    assert code == 1, out
    assert "unexpected skip: test_planted.py::test_needs_a_library: the planted library is not installed" in out
    assert "expected skip: test_planted.py::test_on_cuda: needs a CUDA GPU" in out
    assert "2 skipped: 1 expected on a CPU-only machine, 1 unexpected" in out
    assert "CI refuses 1 unexpected skip(s)" in out


def test_ci_passes_with_expected_skips_only_and_lists_them(tmp_path):
    code, out = run_pytest(planted(tmp_path, skips=False), ["-p", "skip_policy", "test_planted.py"], ci="1")
    assert code == 0, out
    assert "expected skip: test_planted.py::test_on_cuda: needs a CUDA GPU" in out
    assert "1 skipped: 1 expected on a CPU-only machine, 0 unexpected" in out


def test_outside_ci_skips_are_listed_but_do_not_fail(tmp_path):
    for ci in (None, "0", "false"):
        code, out = run_pytest(planted(tmp_path), ["-p", "skip_policy", "test_planted.py"], ci=ci)
        assert code == 0, out
        assert "unexpected skip: test_planted.py::test_needs_a_library" in out and "CI refuses" not in out


def test_ci_without_the_corpora_stops_at_once_saying_where_they_go(tmp_path, monkeypatch):
    missing = tmp_path / "no-data"
    monkeypatch.setenv("GLU_DATA_DIR", str(missing))
    code, out = run_pytest(TESTS.parent, ["--collect-only", "tests/test_plan.py"], ci="1")
    assert code == 1, out
    assert f"CI: no local corpora at {missing}: " in out and "GLU_DATA_DIR" in out
    assert "collected" not in out
