"""A running DicomServer on 127.0.0.1 over a temp SQLite store holding a small worklist."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from broker.config import DicomConfig
from broker.dicom.scp import DicomServer
from broker.domain import Order, OrderControl, PatientData, ProcedureData
from broker.orders import apply_order
from broker.store import Store
from tests.support import free_port

UID_ROOT = "1.2.826.0.1.3680043.10.1491"
DAY = dt.date(2026, 3, 2)


def order(accession: str, patient_id: str, name: str, modality: str, start: dt.datetime,
          *, control: OrderControl = OrderControl.NEW, **procedure: object) -> Order:
    return Order(
        control=control,
        patient=PatientData(patient_id=patient_id, patient_name=name,
                            birth_date=dt.date(1970, 5, 17), sex="F", issuer_of_patient_id="HOSP"),
        procedure=ProcedureData(accession_number=accession, modality=modality,
                                scheduled_start=start, study_instance_uid=f"1.2.3.{patient_id}",
                                scheduled_station_ae_title=f"{modality}01",
                                sps_id=f"SPS-{accession}", requested_procedure_id=f"RP-{accession}",
                                **procedure),  # type: ignore[arg-type]
    )


ORDERS = [
    order("ACC-CT-1", "11", "DOE^JOHN", "CT", dt.datetime.combine(DAY, dt.time(8, 0))),
    order("ACC-MR-1", "12", "Müller^Hans", "MR", dt.datetime.combine(DAY, dt.time(9, 30)),
          requested_procedure_code_value="MRHEAD", requested_procedure_code_scheme="LOCAL",
          requested_procedure_code_meaning="MR Schädel", sps_description="MR Kopf nativ",
          referring_physician_name="HOUSE^GREGORY"),
    order("ACC-MR-2", "13", "SMITH^ANNA", "MR", dt.datetime.combine(DAY, dt.time(10, 0))),
    order("ACC-US-1", "14", "GONE^CANCELLED", "US", dt.datetime.combine(DAY, dt.time(11, 0))),
]


def load(store: Store, orders: list[Order]) -> None:
    with store.writing() as session:
        for item in orders:
            apply_order(session, item, uid_root=UID_ROOT)


@dataclass
class Running:
    server: DicomServer
    store: Store

    @property
    def port(self) -> int:
        return self.server.port


def start_server(store: Store, **config: object) -> DicomServer:
    settings: dict[str, object] = {"host": "127.0.0.1", "port": free_port(),
                                   "network_timeout_seconds": 10}
    settings.update(config)
    server = DicomServer(DicomConfig(**settings), store)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture
def worklist_store(sqlite_store: Store) -> Store:
    load(sqlite_store, ORDERS)
    load(sqlite_store, [dataclasses.replace(ORDERS[3], control=OrderControl.CANCEL)])
    return sqlite_store


@pytest.fixture
def running(worklist_store: Store) -> Iterator[Running]:
    server = start_server(worklist_store)
    yield Running(server, worklist_store)
    server.stop()
