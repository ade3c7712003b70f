"""A real Orthanc (Debian package ``orthanc``) for the tests: its own configuration, free
ports on 127.0.0.1, a temporary storage folder, StableAge 1 s. Stopped and started again on
the same storage when a test wants an outage."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.support import dcmtk, free_port, wait_for

USER, PASSWORD = "broker", "s3cret"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)
    if found is None:
        pytest.fail("Orthanc is not installed; run: apt-get install -y orthanc")
    return found


@dataclass
class OrthancProcess:
    directory: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "TEST-PACS", "DicomAet": "ORTHANC",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "storage"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            # StableStudy 1 s after the last instance (Orthanc's default is 60 s).
            "StableAge": 1, "Plugins": [], "HttpThreadsCount": 4, "ConcurrentJobs": 1,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        }

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = (self.directory / "orthanc.log").open("ab")
        self.process = subprocess.Popen([orthanc_binary(), str(path)], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.directory)
        log.close()

        def answering() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited: {self.log()[-2000:]}")
            try:
                self.get("/system")
            except OSError:
                return False
            return True

        wait_for(answering, timeout=30, what="Orthanc to answer")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return (self.directory / "orthanc.log").read_text(errors="replace")

    def get(self, path: str) -> Any:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def stable_studies(self) -> set[str]:
        """Study Instance UIDs of the studies Orthanc reported stable."""
        uids, since = set(), 0
        for _ in range(1000):  # Orthanc answers at most 100 changes per call
            page = self.get(f"/changes?since={since}&limit=100")
            for change in page["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    uids.add(self.get(f"/studies/{change['ID']}")["MainDicomTags"]
                             ["StudyInstanceUID"])
            since = page["Last"]
            if page["Done"] or not page["Changes"]:
                break
        return uids

    def send_study(self, directory: Path, *, study_uid: str, accession: str, patient_id: str,
                   modality: str = "CT", instances: int = 2) -> None:
        """A small study made with pydicom, sent with DCMTK's storescu as a modality does."""
        directory.mkdir(parents=True, exist_ok=True)
        series_uid = generate_uid()
        files = []
        for number in range(instances):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = SECONDARY_CAPTURE
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.AccessionNumber, ds.PatientID = accession, patient_id
            ds.PatientName, ds.Modality = "TEST^PATIENT", modality
            ds.StudyDate, ds.StudyTime = "20261129", "094100"
            ds.SeriesNumber, ds.InstanceNumber = 1, number + 1
            path = directory / f"{accession}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(str(path))
        done = subprocess.run([dcmtk("storescu"), "-aec", "ORTHANC", "-to", "10",
                               "127.0.0.1", str(self.dicom_port), *files],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr + done.stdout
