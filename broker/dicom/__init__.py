"""The DICOM edge: C-FIND identifiers to worklist queries, MPPS datasets to core requests, the
SCP that serves both, and an MPPS SCU for administrators."""
