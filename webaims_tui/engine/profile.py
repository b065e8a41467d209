"""The PS3.15 Basic Application Level Confidentiality Profile as rules, with its option columns.

The profile's own actions (table E.1-1, "Basic Prof." column) come from the maintained
``dicom-anonymizer`` package, which carries them for the 2026c edition: they are not typed here.
The option columns (Retain UIDs, Retain Device Identity...) are encoded below from the standard;
each option only changes attributes that the basic profile would otherwise remove or replace.

Compound codes are resolved without knowing the IOD: X/Z -> empty (a Type 2 attribute stays
present), X/D, Z/D and X/Z/D -> dummy (a Type 1 attribute stays valid), X/Z/U* on reference
sequences -> keep the sequence and replace the UIDs inside it, so references between
anonymized instances still resolve.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag

from webaims_tui.engine.rules import ProfileOptions, Rule, RuleSet

#: The edition of table E.1-1 the profile's actions come from (a module of dicom-anonymizer).
PROFILE_EDITION = "dicomfields_2026c"

#: dicom-anonymizer's category -> (our action, the standard's code for the dry run).
_CATEGORY_ACTIONS: dict[str, tuple[str, str]] = {
    "D_TAGS": ("dummy", "D"),
    "Z_TAGS": ("empty", "Z"),
    "X_TAGS": ("remove", "X"),
    "U_TAGS": ("uid", "U"),
    "Z_D_TAGS": ("dummy", "Z/D"),
    "X_Z_TAGS": ("empty", "X/Z"),
    "X_D_TAGS": ("dummy", "X/D"),
    "X_Z_D_TAGS": ("dummy", "X/Z/D"),
    "X_Z_U_STAR_TAGS": ("keep", "X/Z/U*"),
}


@dataclass(frozen=True)
class ProfileCode:
    """A CID 7050 De-identification Method code."""

    value: str
    meaning: str


BASIC_PROFILE = ProfileCode("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS = ProfileCode("113105", "Clean Descriptors Option")
RETAIN_LONGITUDINAL_FULL = ProfileCode(
    "113106", "Retain Longitudinal Temporal Information Full Dates Option"
)
RETAIN_LONGITUDINAL_MODIFIED = ProfileCode(
    "113107", "Retain Longitudinal Temporal Information Modified Dates Option"
)
RETAIN_PATIENT_CHARACTERISTICS = ProfileCode("113108", "Retain Patient Characteristics Option")
RETAIN_DEVICE_IDENTITY = ProfileCode("113109", "Retain Device Identity Option")
RETAIN_UIDS = ProfileCode("113110", "Retain UIDs Option")
RETAIN_SAFE_PRIVATE = ProfileCode("113111", "Retain Safe Private Option")
RETAIN_INSTITUTION_IDENTITY = ProfileCode("113112", "Retain Institution Identity Option")

# --- option columns of table E.1-1 (K = keep, C = clean) ------------------------------------

RETAIN_DEVICE_IDENTITY_KEEP: tuple[str, ...] = (
    "CassetteID",
    "DetectorID",
    "DeviceAlternateIdentifier",
    "DeviceDescription",
    "DeviceLabel",
    "DeviceSerialNumber",
    "DeviceUID",
    "GantryID",
    "GeneratorID",
    "ManufacturerDeviceIdentifier",
    "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName",
    "PerformedStationNameCodeSequence",
    "PlateID",
    "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName",
    "ScheduledStationNameCodeSequence",
    "SourceSerialNumber",
    "StationName",
    "TreatmentMachineName",
    "XRayDetectorID",
    "XRayDetectorLabel",
    "XRaySourceID",
)

RETAIN_INSTITUTION_IDENTITY_KEEP: tuple[str, ...] = (
    "InstitutionAddress",
    "InstitutionCodeSequence",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence",
)

RETAIN_PATIENT_CHARACTERISTICS_KEEP: tuple[str, ...] = (
    "EthnicGroup",
    "PatientAge",
    "PatientSex",
    "PatientSexNeutered",
    "PatientSize",
    "PatientWeight",
    "PregnancyStatus",
    "SmokingStatus",
)
RETAIN_PATIENT_CHARACTERISTICS_CLEAN: tuple[str, ...] = (
    "AdditionalPatientHistory",
    "Allergies",
    "MedicalAlerts",
    "Occupation",
    "PatientState",
    "SpecialNeeds",
)

CLEAN_DESCRIPTORS_CLEAN: tuple[str, ...] = (
    "AcquisitionComments",
    "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "CommentsOnThePerformedProcedureStep",
    "ContrastBolusAgent",
    "DerivationDescription",
    "DeviceDescription",
    "DischargeDiagnosisDescription",
    "FrameComments",
    "IdentifyingComments",
    "ImageComments",
    "ImagingServiceRequestComments",
    "InterpretationText",
    "MedicalAlerts",
    "Occupation",
    "PatientComments",
    "PatientState",
    "PerformedProcedureStepDescription",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "RequestedContrastAgent",
    "RequestedProcedureComments",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "SpecialNeeds",
    "StudyComments",
    "StudyDescription",
    "VisitComments",
)

#: Dates the Retain Longitudinal options leave to the basic profile (no K/C in their columns).
_LONGITUDINAL_EXCEPTIONS = frozenset({"PatientBirthDate"})

_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})


@cache
def basic_profile_table() -> tuple[tuple[int, int, str], ...]:
    """(tag value, mask, category) for every entry of table E.1-1, in the package's order."""
    database = dicom_anonymization_database_selector(PROFILE_EDITION)
    table: list[tuple[int, int, str]] = []
    for category in _CATEGORY_ACTIONS:
        for entry in database[category]:
            if len(entry) == 2:
                table.append(((entry[0] << 16) | entry[1], 0xFFFFFFFF, category))
            else:
                group, element, group_mask, element_mask = entry
                value = (group << 16) | element
                table.append((value, (group_mask << 16) | element_mask, category))
    return tuple(table)


def profile_rules(options: ProfileOptions) -> tuple[Rule, ...]:
    """The rules the profile and its options add after the rule set's own rules."""
    if options.name == "none":
        return _private_rules(options)
    rules: list[Rule] = []
    overrides = _option_overrides(options)
    for value, mask, category in basic_profile_table():
        action, code = _CATEGORY_ACTIONS[category]
        match = _match_text(value, mask)
        comment = f"PS3.15 E.1-1 {code}"
        keyword = keyword_for_tag(value) if mask == 0xFFFFFFFF else ""
        vr = _vr_of(value) if mask == 0xFFFFFFFF else ""
        if keyword in overrides:
            action, comment = overrides[keyword]
        elif options.retain_uids and vr == "UI" and action == "uid":
            action, comment = "keep", "Retain UIDs option: K"
        elif (
            vr in _TEMPORAL_VRS
            and keyword not in _LONGITUDINAL_EXCEPTIONS
            and options.retain_longitudinal != "off"
        ):
            if options.retain_longitudinal == "full" or vr == "TM":
                # A time of day carries no date: a day shift leaves it as it is.
                action = "keep"
                comment = f"Retain Longitudinal Temporal Information {options.retain_longitudinal}"
                comment += " dates option: K"
            else:
                action = "shift-date"
                comment = "Retain Longitudinal Temporal Information modified dates option: C"
        rules.append(Rule(match=match, action=action, comment=comment))
    return tuple(rules) + _private_rules(options)


def _private_rules(options: ProfileOptions) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    if options.retain_safe_private:
        rules += [
            Rule(match=entry, action="keep", comment="Retain Safe Private option: K")
            for entry in options.safe_private
        ]
    if options.remove_private:
        rules.append(Rule(match="group:private", action="remove", comment="PS3.15 E.1-1 X"))
    return tuple(rules)


def _option_overrides(options: ProfileOptions) -> dict[str, tuple[str, str]]:
    """keyword -> (action, comment) for attributes whose action an option changes."""
    overrides: dict[str, tuple[str, str]] = {}

    def add(keywords: tuple[str, ...], action: str, option: str) -> None:
        code = "K" if action == "keep" else "C"
        for keyword in keywords:
            if action == "clean" and _vr_of(keyword_dict[keyword]) not in _CLEANABLE:
                continue
            overrides[keyword] = (action, f"{option} option: {code}")

    # Later options win where two columns name one attribute: "keep" is listed last so that
    # an attribute one option keeps whole is not merely cleaned by another.
    if options.clean_descriptors:
        add(CLEAN_DESCRIPTORS_CLEAN, "clean", "Clean Descriptors")
    if options.retain_patient_characteristics:
        add(RETAIN_PATIENT_CHARACTERISTICS_CLEAN, "clean", "Retain Patient Characteristics")
        add(RETAIN_PATIENT_CHARACTERISTICS_KEEP, "keep", "Retain Patient Characteristics")
    if options.retain_device_identity:
        add(RETAIN_DEVICE_IDENTITY_KEEP, "keep", "Retain Device Identity")
    if options.retain_institution_identity:
        add(RETAIN_INSTITUTION_IDENTITY_KEEP, "keep", "Retain Institution Identity")
    return overrides


_CLEANABLE = frozenset({"LO", "SH", "PN", "UC", "LT", "ST", "UT", "SQ"})


def option_codes(options: ProfileOptions) -> tuple[ProfileCode, ...]:
    """The CID 7050 codes for De-identification Method Code Sequence."""
    if options.name == "none":
        return ()
    codes = [BASIC_PROFILE]
    if options.clean_descriptors:
        codes.append(CLEAN_DESCRIPTORS)
    if options.retain_longitudinal == "full":
        codes.append(RETAIN_LONGITUDINAL_FULL)
    elif options.retain_longitudinal == "modified":
        codes.append(RETAIN_LONGITUDINAL_MODIFIED)
    if options.retain_patient_characteristics:
        codes.append(RETAIN_PATIENT_CHARACTERISTICS)
    if options.retain_device_identity:
        codes.append(RETAIN_DEVICE_IDENTITY)
    if options.retain_uids:
        codes.append(RETAIN_UIDS)
    if options.retain_safe_private:
        codes.append(RETAIN_SAFE_PRIVATE)
    if options.retain_institution_identity:
        codes.append(RETAIN_INSTITUTION_IDENTITY)
    return tuple(codes)


def _vr_of(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _match_text(value: int, mask: int) -> str:
    digits = ""
    for shift in range(28, -1, -4):
        digits += f"{(value >> shift) & 0xF:X}" if (mask >> shift) & 0xF else "x"
    return f"({digits[:4]},{digits[4:]})"


DEFAULT_RULE_SET_NAME = "default"


def default_rule_set() -> RuleSet:
    """The rule set a new archive starts with: the Basic profile, private tags removed, dates
    shifted per patient, and Patient ID and Name replaced by one keyed pseudonym."""
    return RuleSet(
        name=DEFAULT_RULE_SET_NAME,
        description=(
            "PS3.15 Basic Application Level Confidentiality Profile with private tags removed "
            "and dates shifted per patient; Patient ID and Patient's Name become the same "
            "keyed pseudonym (the link to the original is kept in the linkage database)"
        ),
        rules=(
            Rule(match="PatientID", action="pseudonym", prefix="SUBJ"),
            Rule(match="PatientName", action="pseudonym", key="PatientID", prefix="SUBJ"),
        ),
        profile=ProfileOptions(),
    )
