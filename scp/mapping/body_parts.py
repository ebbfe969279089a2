"""Body Part Examined (0018,0015) → SNOMED CT, per DICOM PS3.16 Annex L Table L-1.

The table ships as ``scp/data/body_parts.csv`` (its first line names the DICOM edition it was
taken from) and is read once, on first use. Lookups are exact on the defined term after
upper-casing and stripping padding: the table is a list of coded terms, and guessing at near
misses ("ABDOMEN PELVIS") would attach a code nobody sent.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["SNOMED_CT", "BodyPartCode", "body_part_table", "body_site"]

SNOMED_CT = "http://snomed.info/sct"
_PACKAGE = "scp.data"
_FILE = "body_parts.csv"


@dataclass(frozen=True)
class BodyPartCode:
    """One Table L-1 row: a defined term, its SNOMED CT code (``None`` when the table has none)
    and the table's Code Meaning."""

    term: str
    code: str | None
    meaning: str


def _read_text() -> str:
    """The CSV text, via importlib.resources so it works from a wheel or a zip.

    Python 3.11's resource reader cannot handle a namespace package whose ``__path__`` contains a
    setuptools editable-install path hook (it raises NotADirectoryError); in that case the file is
    read from beside this package, which is where an editable install keeps it.
    """
    try:
        return resources.files(_PACKAGE).joinpath(_FILE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, NotADirectoryError, TypeError):
        return (Path(__file__).resolve().parent.parent / "data" / _FILE).read_text(encoding="utf-8")


def _parse(text: str) -> dict[str, BodyPartCode]:
    lines = [line for line in io.StringIO(text) if not line.startswith("#")]
    table: dict[str, BodyPartCode] = {}
    for row in csv.DictReader(lines):
        term = row["term"].strip().upper()
        if not term:
            continue
        if term in table:
            raise ValueError(f"{_FILE}: defined term {term!r} appears twice")
        table[term] = BodyPartCode(term, row["code"].strip() or None, row["meaning"].strip())
    return table


@lru_cache(maxsize=1)
def body_part_table() -> Mapping[str, BodyPartCode]:
    """All Table L-1 defined terms (upper case) → their row; read-only, loaded once."""
    return MappingProxyType(_parse(_read_text()))


def body_site(term: str | None) -> dict[str, Any] | None:
    """A Body Part Examined value → FHIR ``CodeableConcept`` (the caller wraps it in a
    CodeableReference for R5/R6).

    Known term: ``{"coding": [{"system": SNOMED CT, "code", "display": Table L-1 Code Meaning}],
    "text": <the term as received, padding stripped>}``. Unknown terms, and the few terms the table
    gives no code (the FETAL* terms), keep only ``{"text": ...}`` so the information is not lost.
    Blank input → ``None``.
    """
    if term is None:
        return None
    raw = term.strip(" \x00\t\r\n")
    if not raw:
        return None
    row = body_part_table().get(raw.upper())
    if row is None or row.code is None:
        return {"text": raw}
    return {
        "coding": [{"system": SNOMED_CT, "code": row.code, "display": row.meaning}],
        "text": raw,
    }
