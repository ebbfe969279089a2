"""imagingstudy-scp: a DICOM Storage SCP that publishes FHIR ImagingStudy resources."""

__version__ = "0.1.0"
