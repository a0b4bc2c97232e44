"""The converted-checkpoint cache: keyed by a GGUF's content, so copies share one entry."""

from __future__ import annotations

import os
import shutil

import pytest

from services.engine import checkpoint


def test_a_copy_of_the_default_gguf_reuses_its_converted_checkpoint(tmp_path):
    original = checkpoint.default_model_file()
    converted = checkpoint.resolve("default")
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    # Another venv's copy of the same file: no second 0.5 GB conversion in the cache.
    assert checkpoint.resolve(copy) == converted


def flip_byte(path, where: float) -> None:
    """Change one byte at `where` (0: the first, 1: the last) of the file."""
    offset = int(where * (path.stat().st_size - 1))
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["header", "middle", "tail"])
def test_a_changed_gguf_gets_its_own_cache_entry(tmp_path, where):
    original = checkpoint.default_model_file()
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    flip_byte(copy, where)
    assert checkpoint._content_key(copy) != checkpoint._content_key(original)


def test_a_gguf_rewritten_in_place_is_hashed_again(tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(checkpoint.default_model_file(), copy)
    before = checkpoint._content_key(copy)
    flip_byte(copy, 0.5)
    later = copy.stat().st_mtime_ns + 10**9  # a later write, past the clock's granularity
    os.utime(copy, ns=(later, later))
    assert checkpoint._content_key(copy) != before
