"""TLS for our gRPC servers (the gateway, the controller's admin API): a server
certificate reloaded when its files change, and the credentials of a channel that trusts
one CA.

The certificate and key are read again when either file changes, and new connections get
the new pair without a restart (running ones keep theirs): cert-manager renews a Secret,
the kubelet swaps the mounted files, and the server follows. gRPC asks for the current
pair at each handshake; a pair that does not load (the key of one certificate beside the
next, while a rotation is half done) is skipped with a warning, and the last good pair
stays until the files agree again.
"""

from __future__ import annotations

import logging
import os
import ssl

import grpc

log = logging.getLogger(__name__)


class ReloadingCertificate:
    """A server certificate chain and key from PEM files, re-read when they change."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self._stamp = self._stat()
        self._bad: tuple = ()  # a pair that did not load, not to be tried (and logged) again
        self._config = self._load()
        if self._config is None:
            raise ValueError(
                f"cannot load the TLS certificate {cert_path} with the key {key_path}: "
                "give a PEM certificate chain and its own PEM private key"
            )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch)

    def _stat(self) -> tuple:
        """What changes when either file is replaced or rewritten."""
        stamp = []
        for path in (self.cert_path, self.key_path):
            try:
                st = os.stat(path)
            except OSError:
                return ()  # gone for a moment mid-rotation: try again at the next handshake
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _load(self):
        """The pair as gRPC wants it, or None when the files do not make a pair."""
        try:
            with open(self.cert_path, "rb") as c, open(self.key_path, "rb") as k:
                cert, key = c.read(), k.read()
            # gRPC would take a mismatched pair and fail every handshake; ssl checks it.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.cert_path, self.key_path
            )
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS: cannot load %s with %s: %s", self.cert_path, self.key_path, exc)
            return None
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    def _fetch(self):
        """Called by gRPC at each new connection: a new configuration, or None to keep it."""
        stamp = self._stat()
        if not stamp or stamp in (self._stamp, self._bad):
            return None
        config = self._load()
        if config is None or self._stat() != stamp:
            self._bad = stamp if config is None else ()
            return None  # still changing: the next handshake looks again
        self._stamp, self._config = stamp, config
        log.warning("TLS: serving the new certificate from %s", self.cert_path)
        return config


def channel_credentials(ca_path: str) -> grpc.ChannelCredentials:
    """Credentials for a channel that trusts the CA certificates in `ca_path` only."""
    try:
        with open(ca_path, "rb") as f:
            return grpc.ssl_channel_credentials(f.read())
    except OSError as exc:
        raise ValueError(f"cannot read the upstream CA file {ca_path}: {exc}") from None
