"""TLS to Redis: a `rediss://` URL with the CA that verifies the server
(`?ssl_ca_certs=/path/ca.crt`) reaches a Redis that serves TLS only. redis-py reads the
CA file for each new connection, so a CA replaced on disk applies without a restart."""

from __future__ import annotations

import contextlib
import subprocess

import pytest
import redis
from certs import self_signed

from services.common import redis_schema as rs
from services.serve.local import free_port, wait_for_port


@contextlib.contextmanager
def tls_redis(cert, key):
    """A redis-server on loopback that speaks TLS only; yields its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
        + ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        + ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 30, proc, "redis-server with TLS")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_rediss_url_with_its_ca_reaches_a_tls_only_redis(tmp_path):
    cert, key = self_signed(tmp_path, "redis")
    other, _ = self_signed(tmp_path, "other")
    with tls_redis(cert, key) as port:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs="
        assert rs.connect(url + str(cert)).ping()
        with pytest.raises(redis.exceptions.ConnectionError):  # a CA that did not sign it
            rs.connect(url + str(other)).ping()
        with pytest.raises(redis.exceptions.ConnectionError):  # plaintext is not served
            rs.connect(f"redis://127.0.0.1:{port}/0").ping()
        # The CA file replaced on disk: the next connection verifies with the new one.
        ca = tmp_path / "ca.crt"
        ca.write_bytes(other.read_bytes())
        with pytest.raises(redis.exceptions.ConnectionError):
            rs.connect(url + str(ca)).ping()
        ca.write_bytes(cert.read_bytes())
        assert rs.connect(url + str(ca)).ping()
