"""The HL7 edge: MLLP framing and listener, parsing, mapping to core orders, ACKs, status messages.

Imports the broker core (``broker.domain``, ``broker.orders``, ``broker.store``...); the core never
imports this package.
"""
