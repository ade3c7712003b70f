"""worklist-broker: an HL7-fed DICOM Modality Worklist and MPPS broker.

The core (this package's top-level modules except ``app`` and ``cli``) knows nothing of
sockets, pynetdicom or hl7apy. The edges (``hl7_listener``, ``broker.dicom``) translate
protocol messages into the core's typed operations; ``broker.app`` wires them together.
"""

__version__ = "0.1.0"
