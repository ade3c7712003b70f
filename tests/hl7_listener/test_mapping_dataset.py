"""The mapping fills any attribute, with repetitions: IHE RAD TF-2x Appendix B rows the default
mapping carries (allergies from every AL1, weight and size from OBX by OBX-3, PV1 location and
visit...), and an AL1/OBX/PV1-rich order's answer over the network, on SQLite and
PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pydicom import Dataset

from broker.config import DicomConfig
from broker.dicom.scp import DicomServer
from broker.errors import ConfigError, InvalidOrder
from broker.orders import apply_order
from hl7_listener.mapping import load_mapping
from hl7_listener.message import parse
from hl7_listener.samples import render_sample
from tests.dicom.scu import find
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
MAPPING = load_mapping(REPO / "config" / "mapping.yaml")

def _segment(name: str, **fields: str) -> str:
    """A segment with the given fields (``f4="..."`` is field 4), the others empty."""
    numbered = {int(key[1:]): value for key, value in fields.items()}
    return "|".join([name, *(numbered.get(n, "") for n in range(1, max(numbered) + 1))])


RICH = "\r".join([
    "MSH|^~\\&|RIS|RAD|WLB|RAD|20261129073000||ORM^O01|RICH-1|P|2.3.1",
    "PID|1||PAT-9^^^HOSP^MR||ROE^JANE||19900101|F",
    "PV1|1|I|RAD^R12^2^HOSP||||||||||||B6~A1||||V-777^^^HOSP",
    "AL1|1|DA|C0002^IODINATED CONTRAST^LOCAL|SV",
    "AL1|2|MA|^LATEX",
    "AL1|3|FA|PEANUT",
    "ORC|NW|PLC-9|FIL-9||SC",
    _segment("OBR", f1="1", f2="PLC-9", f3="FIL-9", f4="CTABD^CT Abdomen^LOCAL",
             f12="ISO^ISOLATION", f13="Creatinine 1.9", f18="ACC-RICH", f19="RP-9",
             f20="SPS-9", f24="CT", f27="^^^20261129093000", f30="PORT", f31="^Staging"),
    "OBX|1|NM|3141-9^BODY WEIGHT^LN||71.5|kg",
    "OBX|2|NM|^BODY WEIGHT||155|lb",
    "OBX|3|NM|8302-2^BODY HEIGHT^LN||1.69|m",
])


def _dataset(message: str) -> dict:
    order = MAPPING.to_order(parse(message.encode()))
    return json.loads(order.procedure.item_dataset or "{}")


def test_the_ihe_rows_fill_the_item_dataset():
    data = _dataset(RICH)
    assert data["00102110"]["Value"] == ["IODINATED CONTRAST", "LATEX", "PEANUT"]  # Allergies
    assert data["00101030"]["Value"] == ["71.5"]  # weight in kg; the pounds OBX is not it
    assert data["00101020"]["Value"] == ["1.69"]
    assert data["00380500"]["Value"] == ["ISOLATION"]  # Patient State
    assert data["00102000"]["Value"] == ["Creatinine 1.9"]  # Medical Alerts
    assert data["001021C0"]["Value"] == [3]  # Pregnancy Status from PV1-15 B6
    assert data["00380010"]["Value"] == ["V-777"]  # Admission ID
    assert data["00380300"]["Value"] == ["RAD^R12^2^HOSP"]  # Current Patient Location
    assert data["00401002"]["Value"] == ["Staging"]
    assert data["00401004"]["Value"] == ["PORT"]


def test_an_order_without_those_fields_gets_none_of_them():
    plain = RICH.split("\r")
    message = "\r".join(line for line in plain if line[:3] not in ("AL1", "OBX"))
    message = message.replace("B6~A1", "").replace("V-777^^^HOSP", "")
    data = _dataset(message)
    assert not {"00102110", "00101030", "001021C0", "00380010"} & data.keys()


def _mapping(tmp_path: Path, extra: str):
    path = tmp_path / "m.yaml"
    path.write_text("attributes:\n  PatientID: PID-3.1\n  AccessionNumber: OBR-18\n" + extra)
    return load_mapping(path)


def test_any_attribute_in_a_sequence_and_numbers_are_checked(tmp_path):
    mapping = _mapping(tmp_path, "  ScheduledProcedureStepSequence.RequestedContrastAgent: "
                                 "OBR-13\n  PatientWeight: {from: OBX-5, where: {OBX-6.1: kg}}\n")
    order = mapping.to_order(parse(RICH.encode()))
    data = json.loads(order.procedure.item_dataset or "")
    assert data["00400100"]["Value"][0]["00321070"]["Value"] == ["Creatinine 1.9"]
    bad = RICH.replace("||71.5|kg", "||heavy|kg")
    with pytest.raises(InvalidOrder, match="OBX-5 PatientWeight 'heavy' is not a number"):
        mapping.to_order(parse(bad.encode()))


@pytest.mark.parametrize("extra, error", [
    ("  NoSuchKeyword: OBR-13\n", "'NoSuchKeyword' is not a DICOM attribute keyword"),
    ("  PatientWeight: {from: OBX-5, all: true}\n", "'all' applies to multi-valued"),
    ("  Allergies: {from: [AL1-3.2, OBR-13], all: true}\n", "reads the same segment"),
    ("  PatientWeight: {from: OBX-5, where: {PID-3: x}}\n", "'where' reads the segment"),
    ("  PatientWeight: {from: OBX-5, where: [1, 2]}\n", "'where' is a mapping"),
    ("  PixelData: OBX-5\n", "is not a DICOM attribute keyword"),
])
def test_mistakes_in_the_new_options_stop_start_up(tmp_path, extra, error):
    with pytest.raises(ConfigError, match=error):
        _mapping(tmp_path, extra)


def test_mapping_test_shows_each_with_its_source():
    described = MAPPING.describe(parse(RICH.encode()))
    rows = {keyword: (value, source) for keyword, value, source in described[0][1]}
    assert rows["Allergies"] == ("IODINATED CONTRAST\\LATEX\\PEANUT",
                                 "AL1-3.2 | AL1-3.1 (every AL1, every repetition)")
    assert rows["PatientWeight"][0] == "71.5"
    assert rows["PatientWeight"][1].startswith("OBX-5 where OBX-3.2=BODY WEIGHT")
    assert rows["CurrentPatientLocation"] == ("RAD^R12^2^HOSP", "PV1-3")


def test_a_rich_order_reaches_the_modality(store):
    sample = (REPO / "sample_messages" / "02_mr_order.hl7").read_text()
    raw = render_sample(sample, dt.date(2026, 11, 29)).encode()
    with store.writing() as s:
        for order in [*MAPPING.to_orders(parse(raw)), MAPPING.to_order(parse(RICH.encode()))]:
            apply_order(s, order, uid_root="1.2.3")
    server = DicomServer(DicomConfig(host="127.0.0.1", port=free_port(),
                                     network_timeout_seconds=10), store)
    server.start()
    try:
        query = Dataset()
        query.AccessionNumber = ""
        query.Allergies = query.PatientWeight = query.CurrentPatientLocation = ""
        query.PregnancyStatus = None
        query.ScheduledProcedureStepSequence = []
        result = find(server.port, query)
        answers = {ds.AccessionNumber: ds for ds in result.identifiers}
        assert result.final_status == 0x0000 and answers.keys() == {"ACC-MR-0002", "ACC-RICH"}
        mr = answers["ACC-MR-0002"]
        assert list(mr.Allergies) == ["IODINATED CONTRAST MEDIA", "LATEX"]
        assert (str(mr.PatientWeight), mr.CurrentPatientLocation) == ("82.5", "RAD^MR2^1^HOSP")
        assert mr.PregnancyStatus is None  # not sent: empty
        rich = answers["ACC-RICH"]
        assert (rich.PregnancyStatus, str(rich.PatientWeight)) == (3, "71.5")
        assert rich.ScheduledProcedureStepSequence[0].Modality == "CT"
    finally:
        server.stop()
