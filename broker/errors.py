"""The few domain exceptions the core raises; each edge turns them into its protocol's answer."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class for errors the broker reports to a peer instead of crashing."""


class InvalidOrder(BrokerError):
    """An order lacks a required value or carries an invalid one.

    ``location`` names where the value came from (e.g. ``OBR-18``) and ``attribute`` the DICOM
    attribute it feeds, so the HL7 edge can build an ERR segment an administrator can act on.
    """

    def __init__(self, reason: str, *, location: str | None = None,
                 attribute: str | None = None, code: str = "101") -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location
        self.attribute = attribute
        # HL7 table 0357: 101 required field missing, 102 data type error, 103 table value
        # not found, 204 unknown key identifier.
        self.code = code


class UnknownOrder(InvalidOrder):
    """A change or cancel names an order the broker does not hold."""

    def __init__(self, accession_number: str) -> None:
        super().__init__(f"no order with AccessionNumber {accession_number!r}",
                         attribute="AccessionNumber", code="204")
        self.accession_number = accession_number


class UnsupportedMessage(BrokerError):
    """The message type, event or order control code is not one the broker takes."""

    def __init__(self, reason: str, *, location: str | None = None, code: str = "200") -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location
        # HL7 table 0357: 200 unsupported message type, 201 unsupported event code,
        # 203 unsupported version.
        self.code = code


class MppsError(BrokerError):
    """An MPPS request the standard says must be refused, with the DICOM status to return."""

    def __init__(self, status: int, comment: str, error_id: int | None = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        # Error ID (0000,0903) where the standard names one.
        self.error_id = error_id


class ConfigError(BrokerError):
    """Invalid configuration; the message names the key path."""
