"""The HL7 edge: MLLP framing and listener, parsing, mapping, ACKs and the road back to the RIS.

It turns HL7 v2 messages into the core's typed operations (``broker.orders.apply_order``)
and outbox rows into status messages; the core never imports it.
"""
