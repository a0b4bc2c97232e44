"""The converted-checkpoint cache: keyed by a GGUF's content, so copies share one entry."""

from __future__ import annotations

import shutil

from services.engine import checkpoint


def test_a_copy_of_the_default_gguf_reuses_its_converted_checkpoint(tmp_path):
    original = checkpoint.default_model_file()
    converted = checkpoint.resolve("default")
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    # Another venv's copy of the same file: no second 0.5 GB conversion in the cache.
    assert checkpoint.resolve(copy) == converted


def test_a_changed_gguf_gets_its_own_cache_entry(tmp_path):
    original = checkpoint.default_model_file()
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    with copy.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert checkpoint._content_key(copy) != checkpoint._content_key(original)
