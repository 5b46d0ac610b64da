"""A throwaway PKI made with the ``openssl`` command, for TLS and mutual-TLS tests.

``make_pki(folder)`` writes a CA, a server certificate for ``127.0.0.1`` (SAN IP, serverAuth), a client
certificate (clientAuth) signed by that CA, and a second, unrelated CA with a client certificate of its
own (a client the server must reject). EC P-256 keys keep it fast.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")
MISSING_OPENSSL = "the openssl command is not installed"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _key(name: str, cwd: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _key(name, cwd)
    _run(
        "req", "-x509", "-new", "-key", f"{name}.key", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def _leaf(name: str, ca: str, cn: str, extensions: str, cwd: Path) -> None:
    _key(name, cwd)
    _run("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    _run(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    _ca("ca", folder)
    _leaf("server", "ca", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", folder)
    _leaf("client", "ca", "prometheus", "extendedKeyUsage=clientAuth\n", folder)
    _ca("rogue-ca", folder)
    _leaf("rogue-client", "rogue-ca", "prometheus", "extendedKeyUsage=clientAuth\n", folder)
    p = folder
    return Pki(
        p / "ca.pem", p / "server.pem", p / "server.key", p / "client.pem", p / "client.key",
        p / "rogue-ca.pem", p / "rogue-client.pem", p / "rogue-client.key",
    )  # fmt: skip
