"""DICOM UID validation, done once before a UID is ever used to form a path."""

from __future__ import annotations

import re

# PS3.5 9.1: an ISO OID of at least two components, digits only, no leading zero in a component, at most
# 64 characters. Anything else (including "..", "/", spaces, a backslash) could be used to escape the store,
# and a UID FHIR cannot carry as `urn:oid:` (e.g. with a leading zero) would make a study that can never be
# published: both are refused before any path is formed.
_UID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
MAX_UID_LENGTH = 64
# UIDs recently found valid, exactly as given: a study's and a series' UIDs come with every instance
_VALID: set[str] = set()
_VALID_KEEP = 4096


class InvalidUID(ValueError):
    """A UID that is missing, too long, or not digits-and-dots."""


def check_uid(value: object, what: str) -> str:
    """Return ``value`` stripped of DICOM padding if it is a valid UID, else raise.

    ``what`` names the attribute (e.g. "Study Instance UID") so the error says
    exactly which UID was wrong.
    """
    if value.__class__ is str and value in _VALID:
        return value  # type: ignore[return-value]
    if value is None:
        raise InvalidUID(f"{what} is missing")
    text = str(value).rstrip("\x00 ")
    if not text:
        raise InvalidUID(f"{what} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUID(f"{what} is {len(text)} characters long (at most {MAX_UID_LENGTH})")
    if not _UID.fullmatch(text):
        raise InvalidUID(f"{what} {text[:80]!r} is not a valid UID (digits and dots, no leading zeros)")
    if value.__class__ is str and value == text:
        if len(_VALID) >= _VALID_KEEP:
            _VALID.clear()
        _VALID.add(text)
    return text

