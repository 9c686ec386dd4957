"""Certificates for the Kafka security tests, made with the ``openssl`` command line.

A throw-away CA signs the broker's certificate (for 127.0.0.1 and localhost, so that
librdkafka's default host name check passes) and a client certificate whose key is
encrypted (the mTLS case with ``LLMPIPE_SSL_KEY_PASSWORD``). A second CA that signed
nothing the broker uses stands for "a CA the client trusts, but not the broker's".
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_KEY_PASSWORD = "client-key-secret"


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def other_ca(self) -> Path:
        """A CA that signed neither the broker's nor the client's certificate."""
        return self.directory / "other-ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def untrusted_client_cert(self) -> Path:
        return self.directory / "untrusted-client.pem"

    @property
    def untrusted_client_key(self) -> Path:
        return self.directory / "untrusted-client.key"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {result.stderr[-1000:]}")


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, extensions: str, *key_args: str) -> None:
    """A key (PKCS#8, encrypted when ``key_args`` say so) and a certificate ``ca`` signs."""
    _openssl("genpkey", "-algorithm", "RSA", "-out", f"{name}.plain.key", cwd=directory)
    _openssl(
        "pkcs8", "-topk8", "-in", f"{name}.plain.key", "-out", f"{name}.key",
        *(key_args or ("-nocrypt",)),
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", "-key", f"{name}.plain.key", "-subj", f"/CN={name}",
        "-out", f"{name}.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.plain.key").unlink()


def make_pki(directory: Path) -> Pki:
    """CA, broker and client certificates in ``directory`` (the layout kafka.sh reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(
        directory,
        "broker",
        "ca",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    client_ext = "extendedKeyUsage=clientAuth\n"
    _leaf(
        directory,
        "client",
        "ca",
        client_ext,
        "-v2", "aes-256-cbc", "-passout", f"pass:{CLIENT_KEY_PASSWORD}",
    )  # fmt: skip
    _leaf(directory, "untrusted-client", "other-ca", client_ext)
    return Pki(directory)
