"""broker.tls: contexts built from config, with one-line errors naming the key."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from broker.config import DicomTlsConfig, TlsClientConfig, TlsListenerConfig, load_config
from broker.errors import ConfigError
from broker.tls import (
    ContextSource,
    client_context,
    expected_server_name,
    server_context,
    subject_allowed,
)
from tests.tls_certs import Pki, shared_pki

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return shared_pki(tmp_path_factory)


def _listener(pki: Pki, **extra: object) -> TlsListenerConfig:
    settings: dict[str, object] = {"port": 0, "certificate": pki.cert("server"),
                                   "private_key": pki.key("server"), **extra}
    return TlsListenerConfig(**settings)  # type: ignore[arg-type]


def test_server_context_defaults_follow_bcp195(pki: Pki) -> None:
    context = server_context(_listener(pki), base_dir=REPO, where="hl7.tls")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    assert context.options & ssl.OP_NO_COMPRESSION
    suites = {cipher["name"] for cipher in context.get_ciphers()}
    assert "ECDHE-RSA-AES128-GCM-SHA256" in suites
    # Nothing without forward secrecy or without AEAD in TLS 1.2.
    assert not {s for s in suites if s.startswith(("AES", "RSA")) or "CBC" in s
                or s.endswith("SHA")}
    mutual = server_context(_listener(pki, ca_certificates=pki.ca,
                                      require_client_certificate=True),
                            base_dir=REPO, where="hl7.tls")
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    optional = server_context(_listener(pki, ca_certificates=pki.ca), base_dir=REPO,
                              where="hl7.tls")
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_relative_paths_resolve_against_the_config_folder(pki: Pki) -> None:
    config = TlsListenerConfig(port=0, certificate=Path("server.pem"),
                               private_key=Path("server.key"))
    assert server_context(config, base_dir=pki.directory, where="hl7.tls")
    with pytest.raises(ConfigError, match=r"^hl7\.tls\.certificate: cannot read .*server\.pem"):
        server_context(config, base_dir=REPO, where="hl7.tls")


@pytest.mark.parametrize("change, message", [
    ({"certificate": "missing.pem"}, r"^dicom\.tls\.certificate: cannot read .*missing\.pem: "
                                     "No such file"),
    ({"private_key": "missing.key"}, r"^dicom\.tls\.private_key: cannot read "),
    ({"private_key": "client.key"}, r"^dicom\.tls\.private_key: .*client\.key does not match "
                                    r"the certificate .*server\.pem$"),
    ({"certificate": "ca.key"}, r"^dicom\.tls\.certificate: cannot load "),
    ({"ca_certificates": "missing-ca.pem"}, r"^dicom\.tls\.ca_certificates: cannot read "),
    ({"ciphers": "NO-SUCH-CIPHER"}, r"^dicom\.tls\.ciphers: no cipher matches"),
])
def test_bad_files_are_one_line_naming_the_key(pki: Pki, change: dict[str, str],
                                               message: str) -> None:
    settings: dict[str, object] = {"port": 0, "certificate": "server.pem",
                                   "private_key": "server.key", **change}
    with pytest.raises(ConfigError, match=message) as caught:
        server_context(DicomTlsConfig(**settings),  # type: ignore[arg-type]
                       base_dir=pki.directory, where="dicom.tls")
    assert "\n" not in str(caught.value)


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    import subprocess

    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.key("server")), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, capture_output=True)
    config = _listener(pki, private_key=encrypted)
    with pytest.raises(ConfigError, match=r"hl7\.tls\.private_key: .*encrypted private keys"):
        server_context(config, base_dir=REPO, where="hl7.tls")


@pytest.mark.parametrize("settings, message", [
    ({"port": 2762}, "a TLS port needs certificate and private_key"),
    ({"plain_port": False}, "plain_port: false needs a TLS port"),
    ({"port": 2762, "certificate": "a", "private_key": "b", "require_client_certificate": True},
     "require_client_certificate needs ca_certificates"),
])
def test_incomplete_listener_sections_are_refused(tmp_path: Path, settings: dict[str, object],
                                                  message: str) -> None:
    import yaml

    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump({"hl7": {"tls": settings},
                                    "mapping": str(REPO / "config" / "mapping.yaml")}))
    with pytest.raises(ConfigError, match=f"^hl7.tls: .*{message}"):
        load_config(path, environ={})


def test_client_context_checks_the_name_only_where_one_is_configured(pki: Pki) -> None:
    config = TlsClientConfig(enabled=True, ca_certificates=pki.ca)
    assert expected_server_name(config, "ris.example.org") == "ris.example.org"
    assert expected_server_name(config, "10.0.0.5") is None
    named = config.model_copy(update={"server_name": "ris.example.org"})
    assert expected_server_name(named, "10.0.0.5") == "ris.example.org"
    by_ip = client_context(config, host="10.0.0.5", base_dir=REPO, where="ris.tls")
    assert by_ip.verify_mode == ssl.CERT_REQUIRED and not by_ip.check_hostname
    by_name = client_context(config, host="ris.example.org", base_dir=REPO, where="ris.tls")
    assert by_name.verify_mode == ssl.CERT_REQUIRED and by_name.check_hostname
    with pytest.raises(ValueError, match="both certificate and private_key"):
        TlsClientConfig(enabled=True, certificate=pki.cert("client"))


def test_reload_keeps_the_old_context_when_the_new_files_are_broken(pki: Pki,
                                                                     tmp_path: Path) -> None:
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.directory / name, tmp_path / name)
    config = TlsListenerConfig(port=0, certificate=Path("server.pem"),
                               private_key=Path("server.key"))
    source = ContextSource(lambda: server_context(config, base_dir=tmp_path, where="hl7.tls"),
                           "hl7.tls")
    first = source.context
    shutil.copy(pki.key("client"), tmp_path / "server.key")  # no longer matches
    assert source.reload() is False
    assert source.context is first
    shutil.copy(pki.key("server"), tmp_path / "server.key")
    assert source.reload() is True
    assert source.context is not first


@pytest.mark.parametrize("allowed, expected", [
    (["CT1"], True),
    (["CT2", "CT1"], True),
    (["CN=CT1,O=Test Hospital"], True),
    (["O=Test Hospital, CN=CT1"], True),
    (["CN=CT1"], False),  # a whole subject must be the whole subject
    (["CN=CT1,O=Elsewhere"], False),
    (["CT2"], False),
    ([], False),
])
def test_subject_allow_list(allowed: list[str], expected: bool) -> None:
    subject = (("O", "Test Hospital"), ("CN", "CT1"))
    assert subject_allowed(subject, allowed) is expected
    assert subject_allowed((), allowed) is False
