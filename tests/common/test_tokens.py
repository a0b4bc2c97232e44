"""TokenSource: where the gateway and the controller's admin API find their tokens."""

from __future__ import annotations

import os

import pytest

from services.common.tokens import TokenSource


def bump(path, text: str) -> None:
    """New contents with a later mtime, however coarse the file system's clock."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_a_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = TokenSource(path=str(path))
    assert tokens.accepts("Bearer one") and not tokens.accepts("Bearer two")
    bump(path, "two")
    assert tokens.accepts("Bearer two") and not tokens.accepts("Bearer one")
    bump(path, "  ")
    with pytest.raises(ValueError, match="is empty"):
        tokens.current()


def test_only_the_bearer_scheme_with_the_whole_token_passes():
    tokens = TokenSource(value="secret")
    for header in (None, "", "secret", "bearer secret", "Bearer secre", "Bearer secret2"):
        assert not tokens.accepts(header), header
    assert tokens.accepts("Bearer secret")


def test_from_env_takes_the_flag_then_the_file_then_the_value(tmp_path, monkeypatch):
    for name in ("SELFSPEC_TOKEN_FILE", "SELFSPEC_TOKEN", "A_FILE", "A_VALUE"):
        monkeypatch.delenv(name, raising=False)
    assert TokenSource.from_env() is None
    monkeypatch.setenv("SELFSPEC_TOKEN", "gateway")
    assert TokenSource.from_env().current() == "gateway"
    assert TokenSource.from_env(file_env="A_FILE", value_env="A_VALUE") is None
    monkeypatch.setenv("A_VALUE", "value")
    assert TokenSource.from_env(file_env="A_FILE", value_env="A_VALUE").current() == "value"
    in_env, flag = tmp_path / "env", tmp_path / "flag"
    in_env.write_text("from the env file")
    flag.write_text("from the flag")
    monkeypatch.setenv("A_FILE", str(in_env))
    source = TokenSource.from_env(file_env="A_FILE", value_env="A_VALUE")
    assert source.current() == "from the env file"
    source = TokenSource.from_env(str(flag), file_env="A_FILE", value_env="A_VALUE")
    assert source.current() == "from the flag"
    with pytest.raises(ValueError, match="cannot read the token file"):
        TokenSource.from_env(str(tmp_path / "absent"))
