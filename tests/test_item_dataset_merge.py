"""An order's attributes merged into the ones an item keeps (broker.orders.merge_datasets)."""

from __future__ import annotations

import json

from broker.orders import merge_datasets


def _lo(*values: str) -> dict:
    return {"vr": "LO", "Value": list(values)}


def test_the_order_wins_attribute_by_attribute_and_the_rest_is_kept():
    stored = json.dumps({"00102110": _lo("LATEX"), "00102000": _lo("PACEMAKER"),
                         "00400100": {"vr": "SQ", "Value": [{"00321070": _lo("IOPAMIDOL"),
                                                             "00400011": _lo("RAD-2")}]}})
    given = json.dumps({"00102110": _lo("IODINE", "LATEX"),
                        "00400100": {"vr": "SQ", "Value": [{"00321070": _lo("NONE")}]}})
    merged = json.loads(merge_datasets(stored, given) or "")
    assert merged["00102110"] == _lo("IODINE", "LATEX")
    assert merged["00102000"] == _lo("PACEMAKER")
    # The step's single item is merged too: its location stays.
    assert merged["00400100"]["Value"] == [{"00321070": _lo("NONE"), "00400011": _lo("RAD-2")}]


def test_nothing_given_keeps_what_is_stored():
    assert merge_datasets('{"00102110":{"vr":"LO"}}', None) == '{"00102110":{"vr":"LO"}}'
    assert merge_datasets(None, '{"00102110":{"vr":"LO"}}') == '{"00102110":{"vr":"LO"}}'
    assert merge_datasets(None, None) is None
