"""Body Part Examined → SNOMED CT mapping (DICOM PS3.16 Annex L Table L-1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fhir.resources.codeableconcept import CodeableConcept

from scp.mapping.body_parts import SNOMED_CT, body_part_table, body_site

CSV = Path(__file__).resolve().parent.parent / "scp" / "data" / "body_parts.csv"


@pytest.mark.parametrize(
    ("term", "code", "meaning"),
    [
        ("ABDOMEN", "818981001", "Abdomen"),
        ("HEAD", "69536005", "Head"),
        ("KNEE", "72696002", "Knee"),
        ("BREAST", "76752008", "Breast"),
        # Table L-1 of 2025e codes CHEST (and THORAX) as 816094009 "Chest"; older editions used
        # 51185008 / 43799004, which pydicom 3.0's CID 4031 no longer lists for Chest either.
        ("CHEST", "816094009", "Chest"),
        ("THORAX", "816094009", "Chest"),
        ("ABDOMENPELVIS", "818982008", "Abdomen and Pelvis"),
        ("CSPINE", "122494005", "Cervical spine"),
        ("WHOLEBODY", "38266002", "Entire body"),
        ("4THVENTRICLE", "35918002", "Fourth ventricle"),
    ],
)
def test_known_terms(term: str, code: str, meaning: str) -> None:
    concept = body_site(term)
    assert concept == {"coding": [{"system": SNOMED_CT, "code": code, "display": meaning}], "text": term}
    CodeableConcept.model_validate(concept)


def test_case_insensitive_and_padding_stripped_raw_term_kept() -> None:
    assert body_site(" chest \x00") == {
        "coding": [{"system": SNOMED_CT, "code": "816094009", "display": "Chest"}],
        "text": "chest",
    }
    assert body_site("Knee")["coding"][0]["code"] == "72696002"


@pytest.mark.parametrize("term", ["ABDOMEN PELVIS", "LEFT KNEE", "SCHÄDEL", "XYZ"])
def test_unknown_terms_keep_only_the_text(term: str) -> None:
    assert body_site(term) == {"text": term}


def test_terms_without_a_code_in_the_table_keep_only_the_text() -> None:
    assert body_part_table()["FETALHEART"].code is None
    assert body_site("FETALHEART") == {"text": "FETALHEART"}


@pytest.mark.parametrize("term", [None, "", "   ", "\x00"])
def test_blank_is_absent(term: str | None) -> None:
    assert body_site(term) is None


def test_table_is_the_full_annex_l_list() -> None:
    table = body_part_table()
    # PS3.16 2025e Table L-1 has 322 rows with a Body Part Examined defined term.
    assert len(table) == 322
    for term, row in table.items():
        assert term == row.term
        assert re.fullmatch(r"[A-Z0-9 _]{1,16}", term), term  # a CS value
        assert row.meaning
        assert row.code is None or re.fullmatch(r"\d{6,18}", row.code), row
    assert sum(row.code is None for row in table.values()) == 5  # the FETAL* terms


def test_table_is_loaded_once() -> None:
    assert body_part_table() is body_part_table()


def test_csv_names_its_source_and_edition() -> None:
    first, header = CSV.read_text(encoding="utf-8").splitlines()[:2]
    assert first.startswith("#") and "PS3.16" in first and "2025e" in first and "Table L-1" in first
    assert header == "term,code,meaning"
