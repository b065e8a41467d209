"""The residual-PHI check: note an instance's identifying values, then look for them afterwards.

Before anonymizing, :func:`identifying_values` collects the values of the attributes that name
or point at a person or a place (names, IDs, birth date, accession number, institution,
physicians, addresses...) at every sequence depth, with each person-name component on its own.
After anonymizing, :func:`find_residual` scans every remaining text element at every depth for
any of them. The same pattern drives the "clean" action (which removes these values from free
text), so what "clean" leaves is what the check accepts.

A value matches only as a whole word (not inside a longer run of letters, digits and _), case
insensitively: "Smith" is found in "seen by SMITH", but an ID "123" is not found inside a
generated pseudonym "K7123QX". Values shorter than three characters are not searched for: they
occur everywhere by chance.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Attributes whose values identify a person, a place or an encounter.
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "AdmissionID",
    "ServiceEpisodeID",
    "StudyID",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ConsultingPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "ScheduledPerformingPhysicianName",
    "OperatorsName",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PersonName",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "VerifyingObserverName",
    "ContentCreatorName",
    "ReviewerName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
)

IDENTIFYING_TAGS = frozenset(keyword_dict[k] for k in IDENTIFYING_KEYWORDS)

#: The values that name the patient (not their characteristics, physicians or institution):
#: kept by a rule, the output's Patient Identity Removed is NO.
PATIENT_IDENTITY_TAGS = frozenset(
    keyword_dict[k]
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
    )
)

#: Text the equipment or a coding scheme writes, never a person: a patient named "Test" is not
#: leaked by a coding scheme designator "TEST", nor an institution "Here" by a vendor's string.
NOT_SCANNED_KEYWORDS: tuple[str, ...] = (
    "CodingSchemeDesignator",
    "CodingSchemeVersion",
    "MappingResource",
    "ContextIdentifier",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "SpecificCharacterSet",
    "ImageType",
    "Modality",
)
NOT_SCANNED_TAGS = frozenset(keyword_dict[k] for k in NOT_SCANNED_KEYWORDS)

#: VRs whose values are text that could carry an identifying value.
TEXT_VRS = frozenset({"AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})

#: Placeholders that anonymizers (ours too) write: never treated as identifying.
_PLACEHOLDERS = frozenset({"anonymized", "anonymous", "anon", "unknown", "none", "n/a", "removed"})

MIN_LENGTH = 3

#: Unknown (UN) values up to this size are scanned as Latin-1 text; larger ones are binary.
_MAX_UN_SCAN = 4096


@dataclass(frozen=True)
class ResidualHit:
    path: str  # "ReferencedStudySequence[0] > StudyDescription"
    source: str  # the keyword whose value was found (never the value itself: logs stay clean)


class Watchlist:
    """Identifying values of one instance, compiled into one pattern."""

    def __init__(self, values: dict[str, str]) -> None:
        #: value (case-folded) -> the keyword it came from
        self.sources = values
        if values:
            # Longest first so that "John Smith" is removed whole before "John".
            alternatives = sorted(values, key=len, reverse=True)
            body = "|".join(re.escape(v) for v in alternatives)
            self.pattern: re.Pattern[str] | None = re.compile(
                rf"(?<![0-9A-Za-z_])(?:{body})(?![0-9A-Za-z_])", re.IGNORECASE
            )
        else:
            self.pattern = None

    def __bool__(self) -> bool:
        return self.pattern is not None

    def discard(self, values: Iterable[str]) -> Watchlist:
        """A watchlist without ``values`` (kept on purpose by the rule set)."""
        drop = {v.casefold() for v in values}
        return Watchlist({v: k for v, k in self.sources.items() if v not in drop})

    def search(self, text: str) -> str | None:
        """The keyword whose value occurs in ``text``, or None."""
        if self.pattern is None:
            return None
        found = self.pattern.search(text)
        return self.sources.get(found.group(0).casefold(), "?") if found else None

    def clean(self, text: str) -> str:
        """``text`` without any identifying value (runs of spaces left by removal collapsed)."""
        if self.pattern is None:
            return text
        cleaned = self.pattern.sub("", text)
        return re.sub(r"  +", " ", cleaned).strip() if cleaned != text else text


def value_strings(value: object) -> list[str]:
    """The text pieces of an element value: multi-values split, names split into components."""
    if value is None or isinstance(value, bytes | bytearray):
        return []
    # A PersonName iterates over its characters: only real multi-values are split.
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    pieces: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        pieces.append(text)
        if "^" in text or "=" in text:
            pieces += [p.strip() for p in re.split(r"[\^=]", text) if p.strip()]
    return pieces


def _candidate(text: str) -> bool:
    return len(text) >= MIN_LENGTH and text.casefold() not in _PLACEHOLDERS


def identifying_values(dataset: Dataset) -> Watchlist:
    """The identifying values found in ``dataset`` at any depth."""
    found: dict[str, str] = {}
    _collect(dataset, found)
    return Watchlist(found)


def _collect(dataset: Dataset, found: dict[str, str]) -> None:
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        if tag in IDENTIFYING_TAGS:
            element = dataset[tag]
            for piece in value_strings(element.value):
                # A PN's full form and its components both go in: free text may hold either.
                for text in (piece, piece.replace("^", " ").strip()):
                    if _candidate(text):
                        found.setdefault(text.casefold(), element.keyword)
            continue
        if raw.VR == "SQ" or (raw.VR is None and _is_sequence_tag(tag)):
            for item in dataset[tag].value:
                _collect(item, found)


def _is_sequence_tag(tag: int) -> bool:
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def find_residual(dataset: Dataset, watchlist: Watchlist, path: str = "") -> ResidualHit | None:
    """The first remaining text element (any depth) holding an identifying value, or None."""
    if not watchlist:
        return None
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if raw is None:
            continue
        vr = raw.VR
        if vr is None or vr == "UN":
            vr = _dictionary_vr(tag)
        if vr == "SQ":
            element = dataset[tag]
            for index, item in enumerate(element.value):
                hit = find_residual(item, watchlist, f"{path}{element.keyword or tag}[{index}] > ")
                if hit:
                    return hit
            continue
        if vr == "UN" and isinstance(raw, RawDataElement) and raw.value is not None:
            # An unknown element (a kept private in an implicit VR file) may still be text.
            if raw.length <= _MAX_UN_SCAN:
                source = watchlist.search(raw.value.decode("latin-1"))
                if source:
                    return ResidualHit(path=f"{path}{_name(raw)}", source=source)
            continue
        if vr not in TEXT_VRS or tag in NOT_SCANNED_TAGS:
            continue
        element = dataset[tag]
        for piece in value_strings(element.value):
            source = watchlist.search(piece)
            if source:
                return ResidualHit(path=f"{path}{_name(element)}", source=source)
    return None


def _name(element: DataElement | RawDataElement) -> str:
    keyword = getattr(element, "keyword", "")
    return keyword or f"({element.tag >> 16:04X},{element.tag & 0xFFFF:04X})"


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"
