"""TLS for every link: the one place where an ``ssl.SSLContext`` is built from a config section.

Listeners (the DICOM SCP, the MLLP listener) get a server context, outbound links (the RIS,
MPPS forwarding) a client context; both follow BCP 195 (RFC 9325) and the DICOM "BCP 195
Non-Downgrading" profile by default: TLS 1.2 or later, forward-secret AEAD ciphers only, no
compression, no renegotiation. A file that cannot be read, or a key that does not match its
certificate, is a :class:`ConfigError` naming the key, so that start-up stops with one line.

A :class:`ContextSource` holds the context in use and rebuilds it on demand (SIGHUP): every
new connection asks it for the current one, so renewed certificates apply without a restart
and connections already open keep theirs.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from broker.config import TlsClientConfig, TlsListenerConfig
from broker.errors import ConfigError

log = logging.getLogger(__name__)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _file(path: Path, base_dir: Path, key: str) -> str:
    """The resolved path of a PEM file, after checking that it can be read."""
    resolved = path if path.is_absolute() else (base_dir / path)
    try:
        with resolved.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {resolved}: {exc.strerror}") from None
    return str(resolved)


def _no_password() -> bytes:
    # Without this OpenSSL would prompt on the terminal, and a service has none.
    raise ConfigError("encrypted private keys are not supported")


def _reason(exc: ssl.SSLError) -> str:
    return exc.reason or str(exc)


def handshake_failure(exc: BaseException) -> str:
    """A failed handshake in a few words for the log: OpenSSL's reason, and for a certificate
    that did not verify, why (``CERTIFICATE_VERIFY_FAILED: certificate has expired``)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or exc.__class__.__name__


def _common(context: ssl.SSLContext, min_version: str, ciphers: str, where: str) -> None:
    context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f"{where}.ciphers: no cipher matches {ciphers!r}") from None


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, base_dir: Path,
                where: str) -> None:
    cert = _file(certificate, base_dir, f"{where}.certificate")
    key = _file(private_key, base_dir, f"{where}.private_key")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"{where}.private_key: {key}: {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{where}.private_key: {key} does not match the certificate "
                              f"{cert}") from None
        raise ConfigError(f"{where}.certificate: cannot load {cert} with key {key}: "
                          f"{_reason(exc)}") from None


def _load_cas(context: ssl.SSLContext, ca_certificates: Path, base_dir: Path,
              where: str) -> None:
    cafile = _file(ca_certificates, base_dir, f"{where}.ca_certificates")
    try:
        context.load_verify_locations(cafile=cafile)
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}.ca_certificates: cannot load {cafile}: {_reason(exc)}"
                          ) from None


def server_context(config: TlsListenerConfig, *, base_dir: Path, where: str) -> ssl.SSLContext:
    """The context of a TLS listener; ``where`` is the config path (``hl7.tls``)."""
    if config.certificate is None or config.private_key is None:
        raise ConfigError(f"{where}: a TLS port needs certificate and private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(context, config.min_version, config.ciphers, where)
    # The server's preference decides: a client offering a weak suite first gets a strong one.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, config.certificate, config.private_key, base_dir, where)
    if config.ca_certificates is not None:
        _load_cas(context, config.ca_certificates, base_dir, where)
        # CERT_OPTIONAL still refuses a certificate that does not verify (expired, another
        # CA); it only lets a client without one in.
        context.verify_mode = (ssl.CERT_REQUIRED if config.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    return context


def expected_server_name(config: TlsClientConfig, host: str) -> str | None:
    """The name the peer's certificate must carry: ``server_name``, else ``host`` when it is
    a host name; None for an IP address with no ``server_name`` (the chain is still checked)."""
    if config.server_name:
        return config.server_name
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def client_context(config: TlsClientConfig, *, host: str, base_dir: Path,
                   where: str) -> ssl.SSLContext:
    """The context of an outbound TLS link to ``host``; ``where`` is the config path."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED
    _common(context, config.min_version, config.ciphers, where)
    if config.ca_certificates is not None:
        _load_cas(context, config.ca_certificates, base_dir, where)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.certificate is not None and config.private_key is not None:
        _load_chain(context, config.certificate, config.private_key, base_dir, where)
    context.check_hostname = expected_server_name(config, host) is not None
    return context


class ContextSource:
    """The context a link uses now; :meth:`reload` swaps in one built from the files again."""

    def __init__(self, build: Callable[[], ssl.SSLContext], where: str) -> None:
        self._build = build
        self.where = where
        self._lock = threading.Lock()
        self._context = build()  # a ConfigError here stops start-up

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def reload(self) -> bool:
        """Use the certificate files as they are now; on failure keep the current context."""
        with self._lock:
            try:
                context = self._build()
            except ConfigError as exc:
                log.error("TLS certificates of %s not reloaded, the previous ones stay in use: "
                          "%s", self.where, exc)
                return False
            self._context = context
        log.info("TLS certificates of %s reloaded", self.where)
        return True


def listener_source(config: TlsListenerConfig, *, base_dir: Path,
                    where: str) -> ContextSource | None:
    if not config.enabled:
        return None
    return ContextSource(lambda: server_context(config, base_dir=base_dir, where=where), where)


def client_source(config: TlsClientConfig, *, host: str, base_dir: Path,
                  where: str) -> ContextSource | None:
    if not config.enabled:
        return None
    return ContextSource(
        lambda: client_context(config, host=host, base_dir=base_dir, where=where), where)


_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "emailAddress": "EMAILADDRESS", "domainComponent": "DC", "serialNumber": "SERIALNUMBER",
}


def _pairs(subject: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset((_SHORT_NAMES.get(name, name).upper(), value.strip())
                     for name, value in subject)


def subject_of(peercert: dict[str, object] | None) -> tuple[tuple[str, str], ...]:
    """The subject of a certificate from ``SSLSocket.getpeercert()`` as (short name, value)
    pairs, most significant first, as the certificate holds them."""
    if not peercert:
        return ()
    rdns = peercert.get("subject", ())
    return tuple((_SHORT_NAMES.get(name, name), value)
                 for rdn in rdns for name, value in rdn)  # type: ignore[union-attr]


def format_subject(subject: tuple[tuple[str, str], ...]) -> str:
    """RFC 4514 order (least significant first): ``CN=ct1,O=Hospital,C=DE``."""
    return ",".join(f"{name}={value}" for name, value in reversed(subject))


def subject_allowed(subject: tuple[tuple[str, str], ...], allowed: Iterable[str]) -> bool:
    """Whether a certificate subject is one of ``allowed``: a bare common name, or a whole
    subject ``CN=..,O=..`` whose attributes are the certificate's (in any order)."""
    if not subject:
        return False
    names = _pairs(subject)
    common_names = {value for name, value in subject if name == "CN"}
    for entry in allowed:
        if "=" not in entry:
            if entry.strip() in common_names:
                return True
            continue
        parts = [part.partition("=") for part in entry.split(",")]
        if _pairs((name.strip(), value) for name, _, value in parts) == names:
            return True
    return False
