"""Migration from file-based worklists: DCMTK's example worklist in, .wl files out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from sqlalchemy import select

from broker.dicom.wl_files import export_worklist, import_worklist
from broker.models import Patient, WorklistItem
from broker.store import Store
from tests.dicom.dcmtk_examples import WORKLIST, worklist_files

REPO = Path(__file__).resolve().parents[2]


def dcmtk_examples(target: Path) -> list[Path]:
    target.mkdir()
    return worklist_files(target)


def test_import_dcmtk_example_worklist_then_export_and_reimport(tmp_path, sqlite_store,
                                                               store: Store):
    files = dcmtk_examples(tmp_path / "wlistdb")
    result = import_worklist(sqlite_store, tmp_path / "wlistdb", uid_root="1.2.3")
    assert result.imported == len(files) and result.refused == []
    # The examples carry Medical Alerts and the like, which the broker does not store.
    assert result.with_unstored_attributes == len(files)
    with sqlite_store.reading() as s:
        vivaldi = s.execute(select(WorklistItem, Patient).join(WorklistItem.patient)
                            .where(WorklistItem.accession_number == "00000")).one()
    item, patient = vivaldi
    assert (patient.patient_name, item.modality, item.scheduled_station_ae_title) == (
        "VIVALDI^ANTONIO", "MR", "AA32")
    assert item.study_instance_uid == "1.2.276.0.7230010.3.2.101"

    exported = export_worklist(sqlite_store, tmp_path / "out")
    assert exported == len(list((tmp_path / "out").glob("*.wl")))
    one = pydicom.dcmread(next((tmp_path / "out").glob("*.wl")))
    assert one.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.31"
    # What the broker writes, the broker (on either backend) reads back the same.
    again = import_worklist(store, tmp_path / "out", uid_root="1.2.3")
    assert again.imported == exported and again.refused == []

    def rows(st: Store) -> set[tuple]:
        with st.reading() as s:
            return set(s.execute(select(WorklistItem.accession_number, WorklistItem.modality,
                                        WorklistItem.scheduled_start,
                                        WorklistItem.study_instance_uid)).all())
    assert rows(store) <= rows(sqlite_store) and len(rows(store)) == exported


def test_a_broken_file_is_reported_and_the_rest_imported(tmp_path, sqlite_store):
    dcmtk_examples(tmp_path / "wl")
    (tmp_path / "wl" / "zz_broken.wl").write_bytes(b"not dicom at all")
    result = import_worklist(sqlite_store, tmp_path / "wl", uid_root="1.2.3")
    assert [name for name, _ in result.refused] == ["zz_broken.wl"]
    assert result.imported >= 1


def test_import_and_export_commands(tmp_path, sqlite_store):
    import sys

    import yaml

    dcmtk_examples(tmp_path / "wl")
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": sqlite_store.url},
                                      "mapping": str(REPO / "config" / "mapping.yaml")}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker.cli", *args, "--config",
                               str(config)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    imported = cli("import-wl", str(tmp_path / "wl"))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(f"imported {len(list(WORKLIST.glob('*.dump*')))} ")
    exported = cli("export-wl", str(tmp_path / "out"))
    assert exported.returncode == 0 and exported.stdout.startswith("wrote ")
    missing = cli("import-wl", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.startswith("worklist-broker: error: no folder")


def test_a_step_on_several_stations_keeps_the_first_and_says_so(tmp_path, sqlite_store, caplog):
    dcmtk_examples(tmp_path / "wl")
    with caplog.at_level("WARNING", logger="broker.dicom.wl_files"):
        import_worklist(sqlite_store, tmp_path / "wl", uid_root="1.2.3")
    assert "accession 00000: keeping station AA32 of AA32\\AA33" in caplog.text
    with sqlite_store.reading() as s:
        station = s.scalars(select(WorklistItem.scheduled_station_ae_title)
                            .where(WorklistItem.accession_number == "00000")).one()
    assert station == "AA32"
