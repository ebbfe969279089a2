"""imagingstudy-scp: a DICOM Storage SCP that publishes FHIR ImagingStudy resources.

The public API is small: :class:`StorageSCP` (an embedded server for integration tests); the
command line is ``imagingstudy-scp`` (``python -m scp``).
"""

from scp.api import StorageSCP, StudyNotPublished

__all__ = ["StorageSCP", "StudyNotPublished", "__version__"]
__version__ = "0.1.0"
