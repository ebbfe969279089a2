"""The FHIR releases an ImagingStudy can be written for."""

from __future__ import annotations

from enum import StrEnum


class FhirVersion(StrEnum):
    """A FHIR release; R6 (6.0.0-ballot3) is the default output."""

    R4 = "R4"
    R5 = "R5"
    R6 = "R6"

    @classmethod
    def parse(cls, text: str) -> "FhirVersion":
        """Accept ``R6``, ``r6`` or a version number such as ``4.0.1`` / ``5.0.0`` / ``6.0.0-ballot3``."""
        value = text.strip().upper()
        if value in cls.__members__:
            return cls[value]
        major = value.split(".", 1)[0]
        by_major = {"4": cls.R4, "5": cls.R5, "6": cls.R6}
        if major in by_major:
            return by_major[major]
        raise ValueError(f"unknown FHIR version {text!r}: expected R4, R5 or R6")
