"""The SCP over real sockets: DCMTK's findscu and echoscu as modalities, pynetdicom as an SCU."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import threading
from types import SimpleNamespace

import pytest
from pydicom import Dataset
from pynetdicom import evt
from sqlalchemy import text

from broker.config import DicomConfig
from broker.dicom.scp import DicomServer
from broker.domain import OrderControl
from broker.models import Patient, WorklistItem
from tests.dicom.conftest import DAY, Running, load, order, start_server
from tests.dicom.scu import find, findscu
from tests.support import dcmtk


def test_findscu_by_accession_returns_only_the_asked_keys(running: Running, tmp_path):
    rows = findscu(running.port, "AccessionNumber=ACC-MR-1", "PatientName",
                   "(0040,0100)[0].ScheduledProcedureStepStartDate", out_dir=tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row.AccessionNumber == "ACC-MR-1"
    assert str(row.PatientName) == "Müller^Hans"
    assert row.SpecificCharacterSet == "ISO_IR 192"
    assert row.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20260302"
    assert "PatientID" not in row
    assert "Modality" not in row.ScheduledProcedureStepSequence[0]


def test_findscu_by_modality_in_the_step_sequence(running: Running, tmp_path):
    rows = findscu(running.port, "(0040,0100)[0].Modality=MR", "AccessionNumber",
                   out_dir=tmp_path)
    assert [r.AccessionNumber for r in rows] == ["ACC-MR-1", "ACC-MR-2"]
    assert all(r.ScheduledProcedureStepSequence[0].Modality == "MR" for r in rows)
    assert findscu(running.port, "(0040,0100)[0].Modality=US", "AccessionNumber",
                   out_dir=tmp_path / "us") == []  # the only US item is cancelled


def test_companion_command_line_still_works(running: Running):
    # Exactly as the companion's users typed it: default called AE ANY-SCP, host localhost.
    done = subprocess.run([dcmtk("findscu"), "-v", "-W", "-k", "AccessionNumber=ACC-CT-1",
                           "localhost", str(running.port)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "ACC-CT-1" in done.stdout + done.stderr
    assert "Pending" in done.stdout + done.stderr


def test_echoscu(running: Running):
    done = subprocess.run([dcmtk("echoscu"), "-aec", "WORKLISTS", "127.0.0.1",
                           str(running.port)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_nested_query_returns_nested_structure(running: Running):
    identifier = Dataset()
    identifier.PatientName = "doe*"
    identifier.PatientID = ""
    identifier.RequestedProcedureCodeSequence = []
    sps = Dataset()
    sps.Modality = "CT"
    sps.ScheduledStationAETitle = ""
    sps.ScheduledProcedureStepStartDate = "20260302"
    sps.ScheduledProcedureStepStartTime = "0700-0900"
    identifier.ScheduledProcedureStepSequence = [sps]
    result = find(running.port, identifier)
    assert result.final_status == 0x0000
    assert len(result.identifiers) == 1
    answer = result.identifiers[0]
    assert answer.PatientID == "11"
    item = answer.ScheduledProcedureStepSequence[0]
    assert (item.Modality, item.ScheduledStationAETitle) == ("CT", "CT01")
    assert item.ScheduledProcedureStepStartTime == "080000"
    assert len(answer.RequestedProcedureCodeSequence) == 0


def test_query_in_latin1_matches_unicode_names(running: Running):
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 100"
    identifier.PatientName = "Müller*"
    identifier.ScheduledProcedureStepSequence = [Dataset()]
    result = find(running.port, identifier)
    assert [str(r.PatientName) for r in result.identifiers] == ["Müller^Hans"]
    item = result.identifiers[0].ScheduledProcedureStepSequence[0]
    assert item.ScheduledProcedureStepDescription == "MR Kopf nativ"


def test_unknown_and_private_keys_still_answer(running: Running):
    identifier = Dataset()
    identifier.AccessionNumber = "ACC-MR-2"
    identifier.PatientWeight = None
    identifier.OtherPatientIDsSequence = []
    identifier.add_new(0x00090010, "LO", "ACME 1.0")
    identifier.add_new(0x00091001, "LO", "whatever")
    result = find(running.port, identifier)
    assert result.final_status == 0x0000
    assert len(result.identifiers) == 1
    answer = result.identifiers[0]
    assert answer.AccessionNumber == "ACC-MR-2"
    assert "PatientWeight" in answer and not answer.PatientWeight
    assert 0x00091001 not in answer


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_malformed_date_is_a_failure_with_a_comment(running: Running):
    identifier = Dataset()
    identifier.AccessionNumber = ""
    sps = Dataset()
    sps.ScheduledProcedureStepStartDate = "2026-03-02"
    identifier.ScheduledProcedureStepSequence = [sps]
    result = find(running.port, identifier)
    assert result.statuses == [0xA900]
    assert result.identifiers == []
    assert "date" in str(result.final.ErrorComment)


class _BrokenEvent:
    """The slice of a C-FIND event the handler reads, with an identifier pynetdicom cannot
    decode (it decodes lazily, when the handler asks)."""

    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="BROKEN"))
    is_cancelled = False

    @property
    def identifier(self) -> Dataset:
        raise ValueError("truncated element")


def test_undecodable_identifier_is_a_failure_not_a_traceback(worklist_store):
    server = DicomServer(DicomConfig(host="127.0.0.1", port=0), worklist_store)
    responses = list(server._on_find(_BrokenEvent()))  # type: ignore[arg-type]
    assert len(responses) == 1
    status, identifier = responses[0]
    assert isinstance(status, Dataset) and status.Status == 0xC000
    assert "truncated element" in status.ErrorComment
    assert identifier is None


def test_database_failure_is_a_failure_status(running: Running):
    with running.store.writing() as session:
        session.execute(text("ALTER TABLE worklist_item RENAME TO worklist_item_gone"))
    identifier = Dataset()
    identifier.AccessionNumber = ""
    result = find(running.port, identifier)
    assert result.statuses == [0xC001]
    assert "database" in str(result.final.ErrorComment)


def test_allowed_calling_ae_titles(worklist_store):
    server = start_server(worklist_store, allowed_calling_ae_titles=["MODALITY1"])
    try:
        def echo(aet: str) -> int:
            return subprocess.run([dcmtk("echoscu"), "-aet", aet, "127.0.0.1",
                                   str(server.port)], capture_output=True, timeout=30).returncode

        assert echo("MODALITY1") == 0
        assert echo("INTRUDER") != 0
    finally:
        server.stop()


def test_port_zero_binds_an_ephemeral_port_and_a_taken_port_raises(sqlite_store):
    server = start_server(sqlite_store, port=0)
    try:
        assert server.port > 0
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        clash = DicomServer(DicomConfig(host="127.0.0.1", port=server.port), sqlite_store)
        with pytest.raises(OSError):
            clash.start()
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_accepted_sockets_have_tcp_nodelay(running: Running):
    seen: list[int] = []

    def check(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    listener = running.server._server  # the pynetdicom server, to watch its associations
    assert listener is not None
    listener.bind(evt.EVT_ACCEPTED, check)
    done = subprocess.run([dcmtk("echoscu"), "127.0.0.1", str(running.port)],
                          capture_output=True, timeout=30)
    assert done.returncode == 0
    assert seen and seen[0] != 0


def test_concurrent_modalities_while_orders_arrive(running: Running):
    """20 modalities poll at once while the RIS writes: none refused, no failure status."""
    stop = threading.Event()
    written: list[str] = []

    def ris() -> None:
        n = 0
        while not stop.is_set():
            accession = f"LIVE-{n:04d}"
            load(running.store, [order(accession, f"L{n}", f"LIVE^{n}", "MR",
                                       dt.datetime(2026, 3, 9, 14, 0))])
            written.append(accession)
            n += 1

    failures: list[str] = []

    def modality(index: int) -> None:
        try:
            for _ in range(3):
                identifier = Dataset()
                identifier.AccessionNumber = ""
                identifier.PatientName = ""
                sps = Dataset()
                sps.Modality = "MR"
                sps.ScheduledProcedureStepStartDate = "20260302"
                identifier.ScheduledProcedureStepSequence = [sps]
                result = find(running.port, identifier, calling_aet=f"MOD{index:02d}")
                if result.final_status != 0x0000 or len(result.identifiers) != 2:
                    failures.append(f"MOD{index}: {result.statuses[-1]:#06x}")
        except BaseException as exc:
            failures.append(f"MOD{index}: {exc!r}")

    writer = threading.Thread(target=ris)
    writer.start()
    modalities = [threading.Thread(target=modality, args=(i,)) for i in range(20)]
    try:
        for thread in modalities:
            thread.start()
        for thread in modalities:
            thread.join(60)
    finally:
        stop.set()
        writer.join(30)
    assert not any(thread.is_alive() for thread in modalities)
    assert failures == []
    assert written  # the RIS wrote while the modalities polled
    with running.store.reading() as session:
        assert session.query(WorklistItem).join(Patient).filter(
            WorklistItem.accession_number.in_(written)).count() == len(written)


def test_changed_order_is_seen_at_the_next_poll(running: Running, tmp_path):
    load(running.store, [order("ACC-MR-2", "13", "SMITH^ANNA", "CT",
                               dt.datetime.combine(DAY, dt.time(10, 0)),
                               control=OrderControl.CHANGE)])
    rows = findscu(running.port, "(0040,0100)[0].Modality=MR", "AccessionNumber",
                   out_dir=tmp_path)
    assert [r.AccessionNumber for r in rows] == ["ACC-MR-1"]


def test_site_policy_scopes_a_modality_and_sets_visible_statuses(tmp_path):
    import datetime as dt

    from broker.config import DicomConfig, ModalityConfig
    from broker.dicom.scp import DicomServer
    from broker.domain import Order, OrderControl, PatientData, ProcedureData
    from broker.orders import apply_order
    from broker.store import Store
    from tests.dicom.scu import find
    from tests.support import free_port

    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    store.create_schema()
    start = dt.datetime(2026, 11, 29, 9)
    for accession, station, modality in (("OWN", "CT_ROOM1", "CT"), ("OTHER", "CT_ROOM2", "CT"),
                                         ("NOSTATION", None, "CT"), ("MR", None, "MR")):
        with store.writing() as s:
            apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData(
                accession, modality=modality, scheduled_station_ae_title=station,
                scheduled_start=start)), uid_root="1.2.3")
    config = DicomConfig(host="127.0.0.1", port=free_port(),
                         visible_statuses=["SCHEDULED", "HELD"],
                         modalities={"CT_ROOM1": ModalityConfig(only_own_items=True,
                                                                modality="CT")})
    server = DicomServer(config, store)
    server.start()
    try:
        query = Dataset()
        query.AccessionNumber = ""

        def accessions(calling_aet: str) -> list[str]:
            result = find(server.port, query, calling_aet=calling_aet)
            return sorted(ds.AccessionNumber for ds in result.identifiers)

        assert accessions("CT_ROOM1") == ["NOSTATION", "OWN"]
        assert accessions("ANY_OTHER") == ["MR", "NOSTATION", "OTHER", "OWN"]
        with store.writing() as s:
            apply_order(s, Order(OrderControl.HOLD, PatientData("P1"), ProcedureData("MR")),
                        uid_root="1.2.3")
        assert "MR" in accessions("ANY_OTHER")  # HELD is visible by this site's choice
    finally:
        server.stop()
        store.dispose()


def test_per_modality_character_set_with_transliteration(tmp_path):
    import datetime as dt

    import pytest

    from broker.config import DicomConfig, ModalityConfig
    from broker.dicom.scp import DicomServer
    from broker.domain import Order, OrderControl, PatientData, ProcedureData
    from broker.errors import ConfigError
    from broker.orders import apply_order
    from broker.store import Store
    from tests.dicom.scu import find
    from tests.support import free_port

    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    store.create_schema()
    with store.writing() as s:
        apply_order(s, Order(OrderControl.NEW, PatientData("P1", patient_name="ŁUKASZ^ZOË"),
                             ProcedureData("A1", modality="CR",
                                           scheduled_start=dt.datetime(2026, 11, 29, 9))),
                    uid_root="1.2.3")
    modalities = {"OLD_CR": ModalityConfig(character_set="ISO_IR 100"),
                  "OLDER_CR": ModalityConfig(character_set="ISO_IR 6")}
    server = DicomServer(DicomConfig(host="127.0.0.1", port=free_port(),
                                     modalities=modalities), store)
    server.start()
    try:
        query = Dataset()
        query.PatientName = ""

        def answer(calling_aet: str) -> Dataset:
            return find(server.port, query, calling_aet=calling_aet).identifiers[0]

        latin1 = answer("OLD_CR")
        # ë exists in Latin-1 and stays; Ł does not and becomes L.
        assert (latin1.SpecificCharacterSet, str(latin1.PatientName)) == (
            "ISO_IR 100", "LUKASZ^ZOË")
        assert str(answer("OLDER_CR").PatientName) == "LUKASZ^ZOE"
        utf8 = answer("MODERN")
        assert (utf8.SpecificCharacterSet, str(utf8.PatientName)) == ("ISO_IR 192", "ŁUKASZ^ZOË")
    finally:
        server.stop()
        store.dispose()
    bad = DicomConfig(modalities={"X": ModalityConfig(character_set="ISO_IR 999")})
    with pytest.raises(ConfigError, match=r"dicom.modalities.X.character_set"):
        DicomServer(bad, store)


def test_universal_query_window(tmp_path):
    import datetime as dt

    from broker.config import DicomConfig
    from broker.dicom.scp import DicomServer
    from broker.domain import Order, OrderControl, PatientData, ProcedureData
    from broker.orders import apply_order
    from broker.store import Store
    from tests.dicom.scu import find
    from tests.support import free_port

    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    store.create_schema()
    now = dt.datetime.combine(dt.date.today(), dt.time(9))
    for accession, days in (("TODAY", 0), ("LASTYEAR", -365), ("NEXTWEEK", 7)):
        with store.writing() as s:
            apply_order(s, Order(OrderControl.NEW, PatientData("P1"), ProcedureData(
                accession, modality="CT", scheduled_start=now + dt.timedelta(days=days))),
                uid_root="1.2.3")
    server = DicomServer(DicomConfig(host="127.0.0.1", port=free_port(),
                                     universal_query_days=1), store)
    server.start()
    try:
        universal = Dataset()
        universal.AccessionNumber = ""
        assert [d.AccessionNumber for d in find(server.port, universal).identifiers] == [
            "TODAY"]
        identifying = Dataset()
        identifying.AccessionNumber = "LASTYEAR"
        assert [d.AccessionNumber for d in find(server.port, identifying).identifiers] == [
            "LASTYEAR"]
    finally:
        server.stop()
        store.dispose()


def test_names_case_sensitive_is_a_site_setting(worklist_store):
    identifier = Dataset()
    identifier.PatientName = "doe^john"
    identifier.AccessionNumber = ""
    default = start_server(worklist_store)
    strict = start_server(worklist_store, names_case_sensitive=True)
    try:
        assert [r.AccessionNumber for r in find(default.port, identifier).identifiers] == [
            "ACC-CT-1"]
        assert find(strict.port, identifier).identifiers == []
    finally:
        default.stop()
        strict.stop()
