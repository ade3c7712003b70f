"""import-wl and export-wl throughput: N generated worklist files (DCMTK-example-shaped, with
allergies, alerts and two stations) into a fresh SQLite database, and back out. Prints a table.

    python bench/wl_files.py [N]            (default 10,000)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.dicom.wl_files import export_worklist, import_worklist  # noqa: E402
from broker.store import Store  # noqa: E402


def make_files(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for n in range(count):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.AccessionNumber = f"B{n:08d}"
        ds.PatientName, ds.PatientID = f"PATIENT^{n}", f"P{n % (count // 3 + 1):07d}"
        ds.PatientBirthDate, ds.PatientSex = "19700517", "F"
        ds.MedicalAlerts, ds.Allergies = "METASTASIS", ["TANTAL", "IODINE"]
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.1491.{n + 1}"
        ds.RequestingPhysician, ds.RequestedProcedureDescription = "SMITH", "EXAM6"
        step = Dataset()
        step.Modality, step.RequestedContrastAgent = "MR", "BARIUMSULFAT"
        step.ScheduledStationAETitle = ["AA32", "AA33"]
        step.ScheduledProcedureStepStartDate = f"2026{1 + n % 12:02d}{1 + n % 28:02d}"
        step.ScheduledProcedureStepStartTime = "085607"
        step.ScheduledPerformingPhysicianName, step.ScheduledProcedureStepDescription = (
            "JOHNSON", "EXAM74")
        step.ScheduledProcedureStepID, step.ScheduledStationName = f"SPD{n}", "STN456"
        step.ScheduledProcedureStepLocation, step.PreMedication = "B34F56", ""
        ds.ScheduledProcedureStepSequence = [step]
        ds.RequestedProcedureID, ds.RequestedProcedurePriority = f"RP{n}", "LOW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.StudyInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{n:08d}.wl", enforce_file_format=True)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        make_files(folder, count)
        store = Store(f"sqlite:///{tmp}/worklist.db")
        store.create_schema()
        cpu = time.process_time()
        result = import_worklist(store, folder, uid_root="1.2.3")
        import_cpu = time.process_time() - cpu
        assert result.imported == count, result.refused[:3]
        started, cpu = time.perf_counter(), time.process_time()
        exported = export_worklist(store, Path(tmp) / "out")
        export_seconds = time.perf_counter() - started
        export_cpu = time.process_time() - cpu
        store.dispose()
    # CPU time per file says what an idle machine would do; wall time is what was seen here.
    print(f"{'step':<10} {'files':>8} {'seconds':>8} {'files/s':>8} {'CPU ms/file':>12}")
    print(f"{'import-wl':<10} {count:>8} {result.seconds:>8.2f} "
          f"{count / result.seconds:>8.0f} {import_cpu * 1000 / count:>12.3f}")
    print(f"{'export-wl':<10} {exported:>8} {export_seconds:>8.2f} "
          f"{exported / export_seconds:>8.0f} {export_cpu * 1000 / exported:>12.3f}")


if __name__ == "__main__":
    main()
