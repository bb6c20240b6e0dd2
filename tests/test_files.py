"""Atomic outputs: whole or nothing, and with the modes any other file gets."""

import os
import stat

import pytest

from calibrate.errors import GluPruneError
from calibrate.files import atomic_dir, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_an_atomic_file_gets_the_mode_of_a_plain_file(tmp_path, umask_022):
    with atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644


def test_an_atomic_folder_gets_the_mode_of_a_plain_folder(tmp_path, umask_022):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "a").write_text("a")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_a_failed_atomic_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_without_force(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(GluPruneError, match="--force"), atomic_dir(tmp_path / "model"):
        pass
