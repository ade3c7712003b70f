"""Orthanc's configuration (``orthanc.json``, or the folder of ``*.json`` files Debian's
service reads) as a source of the broker's settings: ``MPPSAet`` / ``DicomPortMPPS`` (keys of
the small worklist server the broker replaces) for ``dicom.ae_title`` / ``dicom.port``, and
``HttpPort`` / ``RegisteredUsers`` / ``SslEnabled`` for the REST link, each only where the
broker's own configuration does not set the key.

Orthanc reads its JSON with comments (JsonCpp ``allowComments``): ``//`` to the end of the
line and ``/* ... */``, never inside a string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from broker.config import BrokerConfig
from broker.errors import ConfigError

_DEFAULT_HTTP_PORT = 8042  # Orthanc's own default


def strip_comments(text: str) -> str:
    """The JSON text without ``//`` and ``/* */`` comments; each comment character becomes a
    space (newlines are kept), so a parse error still points at the right line and column."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        char = text[i]
        if in_string:
            out.append(char)
            if char == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if char == '"':
                in_string = False
            i += 1
            continue
        if char == '"':
            in_string = True
            out.append(char)
            i += 1
            continue
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            out.append(" " * (end - i))
            i = end
            continue
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ValueError("a /* comment is never closed")
            out.append("".join(c if c == "\n" else " " for c in text[i:end + 2]))
            i = end + 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _read_one(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"orthanc.config_file: cannot read {path}: {reason}") from None
    try:
        data = json.loads(strip_comments(text))
    except ValueError as exc:
        raise ConfigError(f"orthanc.config_file: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"orthanc.config_file: {path}: the top level must be an object")
    return data


def read_orthanc_config(path: Path) -> dict[str, Any]:
    """One file, or every ``*.json`` of a folder merged in name order (as Orthanc does when
    started with a folder: a key in a later file wins)."""
    if path.is_dir():
        merged: dict[str, Any] = {}
        files = sorted(path.glob("*.json"))
        if not files:
            raise ConfigError(f"orthanc.config_file: no *.json file in {path}")
        for file in files:
            merged.update(_read_one(file))
        return merged
    return _read_one(path)


def _int(data: dict[str, Any], key: str, path: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # Orthanc accepts "4242" as well
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ConfigError(f"orthanc.config_file: {path}: {key} must be a port number, "
                          f"not {value!r}")
    return value


def _set(section: BaseModel, key: str) -> bool:
    """Whether the broker's file or environment gave ``key`` a value (an empty one, as the
    documented ``url:`` in broker.yaml, is not a value)."""
    return key in section.model_fields_set and getattr(section, key) is not None


def apply_orthanc_config(config: BrokerConfig) -> BrokerConfig:
    """``config`` with what ``orthanc.config_file`` supplies; keys set in the broker's own
    file or environment (pydantic's ``model_fields_set``) keep their values."""
    orthanc = config.orthanc
    path = orthanc.config_file
    if path is None:
        return config
    data = read_orthanc_config(path)
    dicom_update: dict[str, Any] = {}
    aet = data.get("MPPSAet")
    if aet is not None and not _set(config.dicom, "ae_title"):
        if not isinstance(aet, str) or not aet.strip() or len(aet.strip()) > 16:
            raise ConfigError(f"orthanc.config_file: {path}: MPPSAet must be an AE title of "
                              f"1 to 16 characters, not {aet!r}")
        dicom_update["ae_title"] = aet.strip()
    port = _int(data, "DicomPortMPPS", path)
    if port is not None and not _set(config.dicom, "port"):
        dicom_update["port"] = port
    orthanc_update: dict[str, Any] = {}
    if not _set(orthanc, "url") and data.get("HttpServerEnabled", True):
        http_port = _int(data, "HttpPort", path) or _DEFAULT_HTTP_PORT
        scheme = "https" if data.get("SslEnabled") else "http"
        # Orthanc listens on every interface; the broker runs beside it.
        orthanc_update["url"] = f"{scheme}://127.0.0.1:{http_port}"
    users = data.get("RegisteredUsers")
    if not _set(orthanc, "username") and isinstance(users, dict) and users:
        username, password = next(iter(users.items()))
        orthanc_update["username"] = str(username)
        if not _set(orthanc, "password"):
            orthanc_update["password"] = str(password)
    # model_copy keeps each section's fields_set, so applying twice changes nothing more.
    return config.model_copy(update={
        "dicom": config.dicom.model_copy(update=dicom_update),
        "orthanc": orthanc.model_copy(update=orthanc_update)})
