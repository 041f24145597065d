"""atomic_write: files get the mode open() would give them, and errors name the file asked for."""

from __future__ import annotations

import os
import stat

import pytest

from fractal_pretrain.atomic import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_file_has_the_umask_mode_and_no_temporary_is_left(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"abc"))
    finally:
        os.umask(old)
    assert (tmp_path / "out.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_missing_folder_is_named_in_the_error(tmp_path):
    target = tmp_path / "missing" / "out.bin"
    with pytest.raises(OSError) as err:
        atomic_write(target, lambda f: f.write(b"abc"))
    assert str(target) in str(err.value) and ".tmp" not in str(err.value)
