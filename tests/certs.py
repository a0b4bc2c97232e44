"""Self-signed certificates for TLS tests: each is its own CA."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest


def self_signed(
    folder: Path, name: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path]:
    """`name.crt` and `name.key` in `folder`, valid for `hosts` (names or IPs)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    try:
        chain, private = _with_cryptography(name, hosts)
    except ImportError:  # not a dependency of selfspec: fall back on the binary
        chain, private = _with_openssl(folder, name, hosts)
    cert.write_bytes(chain)
    key.write_bytes(private)
    return cert, key


def _with_cryptography(name: str, hosts: tuple[str, ...]) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_san(x509, h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), private


def _san(x509, host: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _with_openssl(folder: Path, name: str, hosts: tuple[str, ...]) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("TLS tests need the cryptography package or the openssl binary")
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    out, key = folder / f"{name}.tmp.crt", folder / f"{name}.tmp.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName={sans}"]
        + ["-keyout", str(key), "-out", str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes(), key.read_bytes()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
