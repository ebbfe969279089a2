"""What every sink receives and answers: one interface, many transports.

A sink is told two things about a study: here is its ImagingStudy (:meth:`Sink.publish`), or the
study has no stored instances any more, so whatever the sink holds for it must go
(:meth:`Sink.withdraw`). Without the second, an instance moved to another study (re-sent with
the same SOP Instance UID) stayed listed in the old study's resource: one instance in two studies.
"""

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
    """What a sink did with a publication or a withdrawal, for the log line."""

    sink: str
    detail: str
    fields: dict[str, Any] = field(default_factory=dict)  # structured facts for the "publication" record


class DeliveryError(Exception):
    """A sink could not deliver. ``retryable`` failures are tried again later (the outbox's backoff);
    the others dead-letter the publication until an operator re-queues it."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 outcome: dict[str, Any] | None = None, retry_after: float | None = None,
                 fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.outcome = outcome  # the server's OperationOutcome, when it sent one
        self.retry_after = retry_after
        self.fields = fields or {}


class Sink(Protocol):
    """A destination for ImagingStudy resources (a directory, a FHIR server…)."""

    name: str

    def publish(self, publication: Publication) -> Delivery:
        """Deliver ``publication`` durably or raise; retrying is the caller's business.

        Raise :class:`DeliveryError` to say whether trying again can help; any other exception
        counts as retryable. A sink that writes a FHIR release of its own choosing (a FHIR server's)
        also has ``fhir_version() -> FhirVersion``; the others get the configured release.
        """
        ...

    def withdraw(self, study_uid: str) -> Delivery:
        """Remove durably whatever the sink holds for the study, which has no stored instances any more.

        Called when a study's last instance moved to another study or its files were removed:
        leaving its resource would publish those instances twice, or ones that no longer exist.
        Holding nothing for the study already counts as success (a withdrawal may be repeated,
        e.g. after a crash before it was recorded). Failures are reported like :meth:`publish`'s.
        """
        ...
