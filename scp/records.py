"""Plain data that flows from the C-STORE path to the mapping: no sockets, no disk.

Header values are kept as the DICOM strings (decoded from their Specific
Character Set, padding stripped) so that the mapping, not the receiver, decides
what a value means and what to do when it is invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

# A header value: one string, several strings (VM > 1), or a sequence of items.
PlainValue = Union[str, list[str], list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identity of one SOP instance and the header attributes the mapping needs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    attributes: Mapping[str, PlainValue] = field(default_factory=dict)

    def text(self, keyword: str) -> str | None:
        """The first value of a text attribute, or None when it is absent."""
        value = self.attributes.get(keyword)
        if value is None:
            return None
        if isinstance(value, list):
            first = value[0] if value else None
            return first if isinstance(first, str) else None
        return value

    def texts(self, keyword: str) -> list[str]:
        """Every value of a (possibly multi-valued) text attribute."""
        value = self.attributes.get(keyword)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return [v for v in value if isinstance(v, str)]

    def items(self, keyword: str) -> list[dict[str, Any]]:
        """The items of a sequence attribute (empty when absent)."""
        value = self.attributes.get(keyword)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
        return []


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where and when an instance came from."""

    calling_aet: str | None
    called_aet: str | None
    peer: str | None
    association_id: str | None
    received_at: float


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance that is durably on disk and in the index."""

    header: InstanceHeader
    path: str  # relative to the data dir, always under studies/
    size: int
    provenance: Provenance
