"""Test peers for the SCP: DCMTK's findscu as modalities run it, pynetdicom C-FIND and N-GET
SCUs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStepRetrieve,
    ModalityWorklistInformationFind,
)

from tests.support import dcmtk


def findscu(port: int, *keys: str, out_dir: Path, host: str = "127.0.0.1",
            options: tuple[str, ...] = ()) -> list[Dataset]:
    """Run DCMTK's findscu -W with ``-k`` keys and return the response identifiers it saved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), "-W", "-to", "10", "-X", "-od", str(out_dir), *options]
    for key in keys:
        args += ["-k", key]
    done = subprocess.run([*args, host, str(port)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return [pydicom.dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]


@dataclass
class FindResult:
    identifiers: list[Dataset] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    final: Dataset | None = None

    @property
    def final_status(self) -> int:
        return self.statuses[-1]


def find(port: int, identifier: Dataset, *, calling_aet: str = "TEST_SCU",
         called_aet: str = "WORKLISTS", cancel_after: int | None = None,
         transfer_syntax: str | None = None) -> FindResult:
    """One association, one worklist C-FIND; optionally C-CANCEL after some matches.
    ``transfer_syntax``: the only one proposed (explicit VR little endian for raw datasets,
    which pydicom then sends byte for byte)."""
    ae = AE(ae_title=calling_aet)
    if transfer_syntax is None:
        ae.add_requested_context(ModalityWorklistInformationFind)
    else:
        ae.add_requested_context(ModalityWorklistInformationFind, [transfer_syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association refused"
    result = FindResult()
    try:
        context_id = assoc.accepted_contexts[0].context_id
        for status, response in assoc.send_c_find(identifier, ModalityWorklistInformationFind,
                                                  msg_id=7):
            assert "Status" in status, "no response from the SCP"
            result.statuses.append(int(status.Status))
            result.final = status
            if response is not None and status.Status in (0xFF00, 0xFF01):
                result.identifiers.append(response)
                if cancel_after is not None and len(result.identifiers) == cancel_after:
                    assoc.send_c_cancel(7, context_id)
    finally:
        assoc.release()
    return result


def n_get(port: int, uid: str, tags: list[int], *, calling_aet: str = "TEST_SCU",
          ) -> tuple[Dataset, Dataset | None]:
    """One association, one N-GET of the MPPS Retrieve SOP Class: (status, attribute list)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityPerformedProcedureStepRetrieve)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="WORKLISTS")
    assert assoc.is_established, "association refused"
    try:
        status, attributes = assoc.send_n_get(tags, ModalityPerformedProcedureStepRetrieve, uid)
    finally:
        assoc.release()
    assert "Status" in status, "no response from the SCP"
    return status, attributes
