"""What every sink receives and answers: one interface, many transports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from scp.fhir_version import FhirVersion
from scp.records import StoredInstance


@dataclass(frozen=True)
class Publication:
    """One validated ImagingStudy ready to leave the process."""

    study_uid: str
    version: FhirVersion
    resource: dict[str, Any]
    instances: tuple[StoredInstance, ...] = field(repr=False)


@dataclass(frozen=True)
class Delivery:
    """What a sink did with a publication, for the log line."""

    sink: str
    detail: str


class Sink(Protocol):
    """A destination for ImagingStudy resources (a directory, a FHIR server…)."""

    name: str

    def publish(self, publication: Publication) -> Delivery:
        """Deliver ``publication`` durably or raise; retrying is the caller's business."""
        ...
