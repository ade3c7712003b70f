"""Migration from file-based worklists: DCMTK's example worklist in, the same .wl files out."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from sqlalchemy import select

from broker.dicom.wl_files import export_worklist, import_worklist
from broker.domain import ItemStatus, WorklistRow
from broker.item_dataset import dataset_dict, dataset_json, item_dataset, order_from_dataset
from broker.matching import WorklistQuery, find_worklist
from broker.models import Patient, WorklistItem
from broker.orders import apply_order
from broker.store import Store
from tests.dicom.dcmtk_examples import WORKLIST, worklist_files

REPO = Path(__file__).resolve().parents[2]


def dcmtk_examples(target: Path) -> list[Path]:
    target.mkdir()
    return worklist_files(target)


def comparable(ds: Dataset) -> bytes:
    """A file's dataset as bytes, less what export-wl documents it changes (the file meta,
    Specific Character Set, the step status: docs/conformance-statement.md)."""
    out = Dataset()
    out.update(ds)
    out.pop("SpecificCharacterSet", None)
    for step in out.get("ScheduledProcedureStepSequence", []):
        step.pop("ScheduledProcedureStepStatus", None)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = False, True
    write_dataset(buffer, out)
    return buffer.getvalue()


def by_accession(folder: Path) -> dict[str, Dataset]:
    found = {}
    for path in folder.glob("*.wl"):
        ds = pydicom.dcmread(path)
        found[str(ds.AccessionNumber)] = ds
    return found


def test_import_then_export_gives_back_every_file_unchanged(tmp_path, store: Store):
    files = dcmtk_examples(tmp_path / "wlistdb")
    result = import_worklist(store, tmp_path / "wlistdb", uid_root="1.2.3")
    assert result.imported == len(files) and result.refused == []
    exported = export_worklist(store, tmp_path / "out")
    assert exported == len(files)
    before, after = by_accession(tmp_path / "wlistdb"), by_accession(tmp_path / "out")
    assert before.keys() == after.keys()
    for accession, original in before.items():
        assert comparable(after[accession]) == comparable(original), accession
        # Nothing added: not even an empty attribute the file did not have.
        assert {e.tag for e in after[accession]} - {e.tag for e in original} == {
            pydicom.tag.Tag("SpecificCharacterSet")} - {e.tag for e in original}
    vivaldi = after["00000"]
    assert list(vivaldi.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) == [
        "AA32", "AA33"]
    assert (vivaldi.Allergies, vivaldi.MedicalAlerts) == ("TANTAL", "METASTASIS")
    assert vivaldi.ScheduledProcedureStepSequence[0].RequestedContrastAgent == "BARIUMSULFAT"
    assert vivaldi.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"
    assert after["00000"].file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.31"


def test_imported_columns_keep_every_station(tmp_path, sqlite_store):
    dcmtk_examples(tmp_path / "wlistdb")
    import_worklist(sqlite_store, tmp_path / "wlistdb", uid_root="1.2.3")
    with sqlite_store.reading() as s:
        item, patient = s.execute(select(WorklistItem, Patient).join(WorklistItem.patient)
                                  .where(WorklistItem.accession_number == "00000")).one()
    assert (patient.patient_name, item.modality, item.scheduled_station_ae_title) == (
        "VIVALDI^ANTONIO", "MR", "AA32\\AA33")
    assert item.study_instance_uid == "1.2.276.0.7230010.3.2.101"


def _row(store: Store, accession: str) -> WorklistRow:
    with store.reading() as s:
        return next(r for r in find_worklist(s, WorklistQuery(statuses=tuple(ItemStatus)))
                    if r.procedure.accession_number == accession)


def test_values_changed_since_the_import_are_written_over_the_kept_ones(tmp_path,
                                                                       sqlite_store):
    """A kept value keeps its form; one the RIS or the modality changed since is the new one,
    and the attributes no column holds stay."""
    ds = Dataset()
    ds.AccessionNumber, ds.PatientID, ds.PatientName = "A1", "P1", "DOE^JANE"
    ds.PatientWeight, ds.Allergies = "70", ["IODINE", "LATEX"]
    step = Dataset()
    step.Modality, step.ScheduledProcedureStepStartDate = "CT", "20260302"
    step.ScheduledProcedureStepStartTime, step.PreMedication = "0930", "NONE"
    ds.ScheduledProcedureStepSequence = [step]
    with sqlite_store.writing() as s:
        apply_order(s, order_from_dataset(ds), uid_root="1.2.3")
    kept = item_dataset(_row(sqlite_store, "A1"))
    assert kept.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "0930"
    assert str(kept.PatientWeight) == "70" and list(kept.Allergies) == ["IODINE", "LATEX"]
    with sqlite_store.writing() as s:
        item = s.scalars(select(WorklistItem)).one()
        item.modality, item.status = "MR", ItemStatus.IN_PROGRESS
        item.patient.patient_name = "DOE^JANE^MARIE"
    changed = item_dataset(_row(sqlite_store, "A1"))
    changed_step = changed.ScheduledProcedureStepSequence[0]
    assert (changed_step.Modality, changed_step.ScheduledProcedureStepStatus) == ("MR",
                                                                                  "STARTED")
    assert changed.PatientName == "DOE^JANE^MARIE"
    assert changed_step.PreMedication == "NONE"
    assert changed_step.ScheduledProcedureStepStartTime == "0930"
    assert list(changed.Allergies) == ["IODINE", "LATEX"]


def test_the_fast_reading_of_a_file_is_pydicoms(tmp_path):
    """import-wl decodes text values from the file's bytes itself: the same values as
    pydicom's conversion, for DCMTK's examples and a UTF-8 file with every kind of text."""
    from broker.item_dataset import _json_dict

    files = dcmtk_examples(tmp_path / "wl")
    ds = pydicom.dcmread(files[0])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.OtherPatientIDs = ["ID1", "ID 2"]
    ds.PatientComments = "two\\lines  "
    ds.PatientWeight, ds.AdditionalPatientHistory = "70.5", "  Müller  "
    ds.ScheduledProcedureStepSequence[0].CommentsOnTheScheduledProcedureStep = "é"
    ds.save_as(tmp_path / "utf8.wl")
    for path in [*files, tmp_path / "utf8.wl"]:
        fast = pydicom.dcmread(path)
        slow = pydicom.dcmread(path)
        assert dataset_dict(fast) == _json_dict(slow, None), path.name


def test_export_encoding_reads_back_as_pydicom_writes_it(tmp_path):
    """export-wl encodes text values itself: read back, the same dataset as pydicom's own
    writer gives, for every kind of value an item holds."""
    from broker.dicom.wl_files import _file_meta, encode_explicit_little

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.StudyInstanceUID = "1.2.3.45"  # odd length: padded with a NUL
    ds.Allergies, ds.PatientWeight, ds.PregnancyStatus = ["Jod", "Müller"], "70", 3
    ds.PatientComments = "a\\b  "
    ds.add_new(0x00291010, "OB", b"\x01\x02\x03")
    ds.add_new(0x00290010, "LO", "PRIVATE CREATOR")
    step = Dataset()
    step.ScheduledStationAETitle, step.ScheduledProcedureStepStartTime = ["A1", "B2"], "0930"
    step.ScheduledProtocolCodeSequence = [Dataset(), Dataset()]
    step.ScheduledProtocolCodeSequence[0].CodeValue = "X"
    ds.ScheduledProcedureStepSequence = [step]
    ds.ReferencedStudySequence = []
    theirs = DicomBytesIO()
    theirs.is_little_endian, theirs.is_implicit_VR = True, False
    write_dataset(theirs, ds)
    header = b"\0" * 128 + b"DICM" + _file_meta("1.2.3")
    read = [pydicom.dcmread(io.BytesIO(header + body))
            for body in (encode_explicit_little(ds), theirs.getvalue())]
    assert dataset_dict(read[0]) == dataset_dict(read[1])


def test_dataset_json_keeps_numbers_as_written():
    ds = Dataset()
    ds.PatientWeight, ds.PatientSize = "70", "1.80"
    assert '"Value":["70"]' in dataset_json(ds) and '"Value":["1.80"]' in dataset_json(ds)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the broken file
def test_worker_processes_read_a_large_folder_the_same_way(tmp_path, sqlite_store):
    """A large folder is read by worker processes (forced here on a small one)."""
    files = dcmtk_examples(tmp_path / "wl")
    (tmp_path / "wl" / "zz_broken.wl").write_bytes(b"not dicom at all")
    result = import_worklist(sqlite_store, tmp_path / "wl", uid_root="1.2.3", workers=2,
                             batch_size=3)
    assert (result.imported, [name for name, _ in result.refused]) == (len(files),
                                                                        ["zz_broken.wl"])
    with sqlite_store.reading() as s:
        station = s.scalars(select(WorklistItem.scheduled_station_ae_title)
                            .where(WorklistItem.accession_number == "00000")).one()
    assert station == "AA32\\AA33"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the broken files
def test_a_broken_file_is_reported_by_name_and_the_rest_imported(tmp_path, store):
    files = dcmtk_examples(tmp_path / "wl")
    (tmp_path / "wl" / "zz_broken.wl").write_bytes(b"not dicom at all")
    bad = pydicom.dcmread(files[0])
    bad.AccessionNumber = "X" * 20  # longer than SH allows: refused by the store
    bad.save_as(tmp_path / "wl" / "zz_long.wl")
    result = import_worklist(store, tmp_path / "wl", uid_root="1.2.3", batch_size=4)
    assert sorted(name for name, _ in result.refused) == ["zz_broken.wl", "zz_long.wl"]
    assert result.imported == len(files)


def test_import_and_export_commands(tmp_path, sqlite_store):
    dcmtk_examples(tmp_path / "wl")
    (tmp_path / "wl" / "broken.wl").write_bytes(b"not dicom")
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker.cli", *args, "--config",
                               str(config)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    imported = cli("import-wl", str(tmp_path / "wl"))
    examples = len(list(WORKLIST.glob("*.dump*")))
    # Not a terminal: one summary line, and the bad file by name.
    assert imported.returncode == 1, imported.stderr
    assert imported.stdout.startswith(f"imported {examples} worklist files from ")
    assert imported.stdout.count("\n") == 1
    assert "not imported: broken.wl: " in imported.stderr
    exported = cli("export-wl", str(tmp_path / "out"))
    assert exported.returncode == 0 and exported.stdout.startswith(f"wrote {examples} ")
    missing = cli("import-wl", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("worklist-broker: error: no folder")
