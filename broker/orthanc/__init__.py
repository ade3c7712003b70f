"""The Orthanc link (an edge): Orthanc's REST API client, the job that follows its change
feed into the core's ``record_study_arrival``, and the reader of ``orthanc.json``."""
