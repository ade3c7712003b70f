"""Certificates for the TLS tests, made with the ``openssl`` command (no extra dependency).

``make_pki(directory)`` writes a test CA, a server certificate for localhost / 127.0.0.1, a
client certificate, an expired client certificate, and a client certificate from another
CA, each as ``NAME.pem`` + ``NAME.key``.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

_CA_CONFIG = """
[ca]
default_ca = test_ca
[test_ca]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = anything
copy_extensions = none
unique_subject = no
[anything]
commonName = supplied
organizationName = optional
[server]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth, serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


@dataclass(frozen=True)
class Pki:
    directory: Path

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.cert("ca")


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise AssertionError("the openssl command is needed for the TLS tests")
    subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str, subject: str) -> Path:
    ca_dir = directory / f"{name}-db"
    (ca_dir / "issued").mkdir(parents=True)
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "serial").write_text("1000\n")
    config = ca_dir / "openssl.cnf"
    config.write_text(_CA_CONFIG.format(dir=ca_dir))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
             str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem"),
             "-subj", subject, "-days", "3650", "-config", str(config),
             "-extensions", "ca_ext")
    return config


def _issue(directory: Path, ca: str, config: Path, name: str, subject: str, extensions: str,
           dates: tuple[str, str] | None = None) -> None:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", subject)
    validity = (["-startdate", dates[0], "-enddate", dates[1]] if dates
                else ["-days", "365"])
    _openssl("ca", "-batch", "-config", str(config), "-cert", str(directory / f"{ca}.pem"),
             "-keyfile", str(directory / f"{ca}.key"), "-in", str(csr),
             "-out", str(directory / f"{name}.pem"), "-extensions", extensions, "-notext",
             *validity)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    config = _make_ca(directory, "ca", "/O=Test Hospital/CN=Test CA")
    _issue(directory, "ca", config, "server", "/O=Test Hospital/CN=localhost", "server")
    # The same host's next certificate, to see a reload take effect.
    _issue(directory, "ca", config, "renewed", "/O=Test Hospital/CN=renewed.localhost",
           "server")
    _issue(directory, "ca", config, "client", "/O=Test Hospital/CN=CT1", "client")
    _issue(directory, "ca", config, "other-client", "/O=Test Hospital/CN=CT2", "client")
    _issue(directory, "ca", config, "expired", "/O=Test Hospital/CN=CT1", "client",
           dates=("20200101000000Z", "20210101000000Z"))
    other = _make_ca(directory, "rogue-ca", "/O=Elsewhere/CN=Rogue CA")
    _issue(directory, "rogue-ca", other, "rogue", "/O=Test Hospital/CN=CT1", "client")
    return Pki(directory)


_SHARED: dict[str, Pki] = {}


def shared_pki(factory: object) -> Pki:
    """One set of certificates per test session (``factory``: pytest's tmp_path_factory);
    making them costs about two seconds."""
    if "pki" not in _SHARED:
        _SHARED["pki"] = make_pki(factory.mktemp("pki"))  # type: ignore[attr-defined]
    return _SHARED["pki"]


def client_context(pki: Pki, client: str | None = "client", *,
                   ca: Path | None = None) -> ssl.SSLContext:
    """A Python client context trusting the test CA, with ``client``'s certificate if any."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca or pki.ca))
    if client is not None:
        context.load_cert_chain(str(pki.cert(client)), str(pki.key(client)))
    return context
