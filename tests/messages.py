"""HL7 test messages built by field number, so no test miscounts its pipes."""

from __future__ import annotations


def segment(name: str, fields: dict[int, str]) -> str:
    if name == "MSH":
        # MSH-1 is the field separator itself: MSH-2 is the first text after "MSH|".
        last = max(fields)
        return "MSH|" + "|".join(fields.get(i, "") for i in range(2, last + 1))
    last = max(fields) if fields else 0
    return "|".join([name] + [fields.get(i, "") for i in range(1, last + 1)])


def orm(*, control: str = "NW", control_id: str = "MSG-1", version: str = "2.3.1",
        patient_id: str = "PAT-1", patient_name: str = "MUSTERMANN^ERIKA", birth_date: str =
        "19650412", sex: str = "F", accession: str = "ACC-1", modality: str = "CT",
        start: str = "20261129093000", placer: str = "PLC-1", filler: str = "FIL-1",
        code: str = "CTHEAD^CT Head^LOCAL", referring: str = "1234^HOUSE^GREGORY^^^DR",
        requesting: str = "5678^WILSON^JAMES", study_uid: str | None = None,
        message_type: str = "ORM^O01", charset: str | None = None, tq1: bool = False,
        extra_pid: dict[int, str] | None = None, terminator: str = "\r",
        start_in: str | None = "OBR-27") -> str:
    """``start_in``: where the scheduled start goes without TQ1 (OBR-27, ORC-7 or None)."""
    msh = {2: "^~\\&", 3: "RIS", 4: "HOSP", 5: "WLB", 6: "HOSP", 7: "20261129080000",
           9: message_type, 10: control_id, 11: "P", 12: version}
    if charset:
        msh[18] = charset
    pid = {1: "1", 3: f"{patient_id}^^^HOSP", 5: patient_name, 7: birth_date, 8: sex}
    pid.update(extra_pid or {})
    obr = {1: "1", 2: placer, 3: filler, 4: code, 16: requesting, 18: accession, 19: "RP-1",
           20: "SPS-1", 24: modality}
    orc = {1: control, 2: placer, 3: filler, 5: "SC"}
    if not tq1 and start_in == "OBR-27":
        obr[27] = f"^^^{start}"
    elif not tq1 and start_in == "ORC-7":
        orc[7] = f"^^^{start}"
    segments = [segment("MSH", msh), segment("PID", pid), segment("PV1", {2: "O", 8: referring}),
                segment("ORC", orc)]
    if tq1:
        segments.append(segment("TQ1", {1: "1", 7: start}))
    segments.append(segment("OBR", obr))
    if study_uid:
        segments.append(segment("ZDS", {1: f"{study_uid}^RIS^Application^DICOM"}))
    return terminator.join(segments) + terminator


def omi(*, control_id: str = "OMI-1", ipcs: list[dict[int, str]], control: str = "NW",
        placer: str = "PLC-9", start: str = "20261129100000") -> str:
    """OMI^O23 (IHE, v2.5.1): one ORC/TQ1/OBR group with one IPC per scheduled step."""
    segments = [
        segment("MSH", {2: "^~\\&", 3: "RIS", 4: "HOSP", 5: "WLB", 6: "HOSP",
                        7: "20261129080000", 9: "OMI^O23^OMI_O23", 10: control_id, 11: "P",
                        12: "2.5.1"}),
        segment("PID", {1: "1", 3: "PAT-9^^^HOSP", 5: "ROSSI^MARIA", 7: "19920305", 8: "F"}),
        segment("ORC", {1: control, 2: placer, 3: "FIL-9", 5: "SC"}),
        segment("TQ1", {1: "1", 7: start}),
        segment("OBR", {1: "1", 2: placer, 3: "FIL-9", 4: "MRBRAIN^MR Brain^LOCAL"}),
    ]
    segments += [segment("IPC", ipc) for ipc in ipcs]
    return "\r".join(segments) + "\r"


def adt(event: str, *, patient_id: str = "PAT-1", patient_name: str = "MUSTERMANN^ERIKA",
        old_patient_id: str | None = None, control_id: str = "ADT-1") -> str:
    segments = [
        segment("MSH", {2: "^~\\&", 3: "RIS", 4: "HOSP", 5: "WLB", 6: "HOSP",
                        7: "20261129080000", 9: f"ADT^{event}", 10: control_id, 11: "P",
                        12: "2.4"}),
        segment("EVN", {1: event, 2: "20261129080000"}),
        segment("PID", {1: "1", 3: f"{patient_id}^^^HOSP", 5: patient_name, 7: "19650412",
                        8: "F"}),
    ]
    if old_patient_id:
        segments.append(segment("MRG", {1: f"{old_patient_id}^^^HOSP"}))
    segments.append(segment("PV1", {2: "O"}))
    return "\r".join(segments) + "\r"
