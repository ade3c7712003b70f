"""The DICOM edge: the pynetdicom SCP (C-ECHO, Modality Worklist C-FIND, MPPS), the
translation between DICOM datasets and the core's plain objects, and an MPPS SCU."""
