"""The rule engine on a realistic instance: every action, selector, profile option and safety net.

Data sets are built with pydicom, written as Part 10 and read back (so elements arrive raw, as
the autoloader's do), then anonymized with real keys.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import date, timedelta

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from webaims_tui.config import AnonymizationSettings
from webaims_tui.engine.anonymize import (
    AnonymizationRefused,
    RuleAnonymizer,
)
from webaims_tui.engine.linkage import Keys, Linkage
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.engine.rules import ProfileOptions, Rule, RuleSet, RuleSetInvalid

SECRET = bytes(range(32))
PIXELS = bytes(range(256)) * 2

ORIGINAL_SOP = "1.2.826.0.1.3680043.10.999.1.1"
ORIGINAL_STUDY = "1.2.826.0.1.3680043.10.999.2"
REFERENCED_SOP = "1.2.826.0.1.3680043.10.999.1.0"


def make_dataset(**changes: object) -> Dataset:
    """A CT instance full of identifying data, at the top level, in sequences and in privates."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ORIGINAL_SOP
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SENDERAE"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ORIGINAL_SOP
    ds.StudyInstanceUID = ORIGINAL_STUDY
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.3"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.999.4"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.PatientName = "Doe^Johnathan"
    ds.PatientID = "PAT12345"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "M"
    ds.PatientAge = "047Y"
    ds.PatientWeight = "81.5"
    ds.PatientSize = "1.8"
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.SeriesDate = "20240115"
    ds.AcquisitionDateTime = "20240115101700.000000"
    ds.AccessionNumber = "ACC99887"
    ds.StudyID = "STUDY42"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.InstitutionAddress = "1 Main Street, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StationName = "CTSCANNER7"
    ds.DeviceSerialNumber = "SN4711"
    ds.StudyDescription = "CT chest for Johnathan Doe"
    ds.SeriesDescription = "Axial 1mm"
    ds.ImageComments = "checked by House"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = REFERENCED_SOP
    ds.ReferencedImageSequence = Sequence([ref])
    request = Dataset()
    request.AccessionNumber = "ACC99887"
    request.RequestedProcedureID = "RP777"
    inner = Dataset()
    inner.PersonName = "Nurse^Ratched"
    request.ContentSequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([request])
    safe = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    safe.add_new(0x23, "DS", "27.5")
    secret = ds.private_block(0x0009, "ACME_SECRET", create=True)
    secret.add_new(0x01, "LO", "Johnathan Doe at home")
    ds.add_new(0x50003000, "OB", b"\x01\x02\x03\x04")  # curve data
    ds.add_new(0x60000010, "US", 2)  # overlay rows
    ds.add_new(0x60003000, "OW", b"\x00\x00\x00\x00")  # overlay data
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = PIXELS
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return roundtrip(ds)


def roundtrip(ds: Dataset, **read: object) -> Dataset:
    """Write as Part 10 and read back: elements come back raw, as the autoloader sees them."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer, **read)  # type: ignore[arg-type]


def anonymizer(
    rules: tuple[Rule, ...] = (),
    *,
    profile: ProfileOptions | None = None,
    lookup: dict[str, dict[str, str]] | None = None,
    secret: bytes = SECRET,
    linkage: Linkage | None = None,
    **settings: object,
) -> RuleAnonymizer:
    rule_set = RuleSet(
        name="test",
        rules=rules,
        profile=profile or ProfileOptions(name="none", remove_private=False),
        lookup=lookup or {},
    )
    return RuleAnonymizer(
        rule_set,
        Keys(secret),
        AnonymizationSettings(**settings),  # type: ignore[arg-type]
        version=7,
        linkage=linkage,
    )


#: After the rules under test: everything else identifying in make_dataset() goes, so that the
#: residual-PHI check (always on) judges only what the tested rules leave.
SCRUB = (
    Rule("vr:PN", "empty"),
    Rule("PatientID", "empty"),
    Rule("PatientBirthDate", "empty"),
    Rule("AccessionNumber", "empty"),
    Rule("StudyID", "empty"),
    Rule("RequestedProcedureID", "empty"),
    Rule("InstitutionName", "remove"),
    Rule("InstitutionAddress", "remove"),
    Rule("StudyDescription", "remove"),
    Rule("ImageComments", "remove"),
    Rule("(0009,xxxx)", "remove"),
)


def only(*rules: Rule, **kwargs: object) -> Callable[[Dataset], Dataset]:
    """Anonymize with these rules (then SCRUB, no profile); return the result read back."""
    engine = anonymizer(rules + SCRUB, **kwargs)  # type: ignore[arg-type]

    def run(ds: Dataset) -> Dataset:
        return roundtrip(engine.anonymize(ds).dataset)

    return run


def basic(**options: object) -> Dataset:
    """The synthetic instance through the Basic profile with these options (dates off unless
    asked), private tags removed."""
    options.setdefault("retain_longitudinal", "off")
    engine = anonymizer(profile=ProfileOptions(**options))  # type: ignore[arg-type]
    return roundtrip(engine.anonymize(make_dataset()).dataset)


def codes(ds: Dataset) -> set[str]:
    return {item.CodeValue for item in ds.get("DeidentificationMethodCodeSequence", [])}


# --- each action ----------------------------------------------------------------------------


def test_remove() -> None:
    out = only(Rule("PatientAge", "remove"))(make_dataset())
    assert "PatientAge" not in out


def test_empty_keeps_the_element_with_no_value() -> None:
    out = only(Rule("AccessionNumber", "empty"), Rule("ReferencedImageSequence", "empty"))(
        make_dataset()
    )
    assert "AccessionNumber" in out and out.AccessionNumber == ""
    assert "ReferencedImageSequence" in out and len(out.ReferencedImageSequence) == 0


def test_dummy_writes_a_valid_value_for_the_vr() -> None:
    out = only(
        Rule("PatientName", "dummy"),
        Rule("StudyDate", "dummy"),
        Rule("PatientWeight", "dummy"),
        Rule("RequestAttributesSequence", "dummy"),
    )(make_dataset())
    assert out.PatientName == "ANONYMIZED"
    assert out.StudyDate == "19000101"
    assert float(out.PatientWeight) == 0
    # D on a sequence: every value inside, at any depth, replaced; the structure stays.
    item = out.RequestAttributesSequence[0]
    assert item.AccessionNumber == "ANONYMIZED"
    assert item.ContentSequence[0].PersonName == "ANONYMIZED"


def test_keep_leaves_the_value_alone() -> None:
    out = only(Rule("PatientName", "keep"), Rule("vr:PN", "empty"))(make_dataset())
    assert out.PatientName == "Doe^Johnathan"
    assert out.ReferringPhysicianName == ""


def test_clean_removes_identifying_text_from_free_text() -> None:
    out = only(
        Rule("PatientName", "empty"),
        Rule("ReferringPhysicianName", "empty"),
        Rule("StudyDescription", "clean"),
        Rule("ImageComments", "clean"),
    )(make_dataset())
    assert out.StudyDescription == "CT chest for"
    assert out.ImageComments == "checked by"


def test_uid_is_keyed_valid_and_under_the_root() -> None:
    keys = Keys(SECRET)
    out = only(Rule("SOPInstanceUID", "uid"), Rule("vr:UI", "keep"))(make_dataset())
    new = out.SOPInstanceUID
    assert new == keys.uid(ORIGINAL_SOP) != ORIGINAL_SOP
    assert new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
    assert out.StudyInstanceUID == ORIGINAL_STUDY
    # The file meta follows the SOP Instance UID; the sender's AE title is dropped.
    assert out.file_meta.MediaStorageSOPInstanceUID == new
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_uid_under_a_configured_root() -> None:
    root = "1.2.826.0.1.3680043.10.54321"
    keys = Keys(SECRET, uid_root=root)
    new = keys.uid(ORIGINAL_SOP)
    assert new.startswith(root + ".") and len(new) <= 64 and UID(new).is_valid
    assert keys.uid(ORIGINAL_SOP) == new and keys.uid(ORIGINAL_STUDY) != new


def test_set_writes_a_constant() -> None:
    out = only(Rule("PatientName", "set", value="TRIAL^SUBJECT"), Rule("Rows", "set", value="16"))(
        make_dataset()
    )
    assert out.PatientName == "TRIAL^SUBJECT"
    assert out.Rows == 16


def test_pseudonym_is_keyed_consistent_and_can_follow_another_element(tmp_path) -> None:
    linkage = Linkage(f"sqlite:///{tmp_path / 'linkage.sqlite3'}")
    rules = (
        Rule("PatientID", "pseudonym", prefix="SUBJ"),
        Rule("PatientName", "pseudonym", key="PatientID", prefix="SUBJ"),
    )
    first = only(*rules, linkage=linkage)(make_dataset())
    again = only(*rules, linkage=linkage)(make_dataset(PatientName="Other^Spelling"))
    other = only(*rules, linkage=linkage)(make_dataset(PatientID="PAT99999"))
    assert first.PatientID.startswith("SUBJ") and first.PatientID != "PAT12345"
    assert first.PatientName == first.PatientID  # keyed by the Patient ID, not the name
    assert again.PatientID == first.PatientID == again.PatientName
    assert other.PatientID != first.PatientID
    entries = linkage.lookup(first.PatientID)
    assert [(e.kind, e.original) for e in entries] == [("PatientID", "PAT12345")]
    assert linkage.count() == 2


def test_shift_date_moves_one_patient_by_one_offset() -> None:
    keys = Keys(SECRET)
    days = keys.date_shift_days("PAT12345", 3650)
    rules = (Rule("vr:DA", "shift-date"), Rule("vr:DT", "shift-date"))
    first = only(*rules)(make_dataset())
    later = only(*rules)(make_dataset(StudyDate="20240301"))
    expected = (date(2024, 1, 15) - timedelta(days=days)).strftime("%Y%m%d")
    assert first.StudyDate == expected
    assert first.AcquisitionDateTime == expected + "101700.000000"
    # The interval between one patient's studies is kept.
    assert (_day(later.StudyDate) - _day(first.StudyDate)).days == 46
    other_patient = only(*rules)(make_dataset(PatientID="PAT99999"))
    assert other_patient.StudyDate != first.StudyDate or days == keys.date_shift_days(
        "PAT99999", 3650
    )


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def test_lookup_maps_and_refuses_unknown_values() -> None:
    table = {"subjects": {"PAT12345": "TRIAL-001"}}
    run = only(Rule("PatientID", "lookup", table="subjects"), lookup=table)
    assert run(make_dataset()).PatientID == "TRIAL-001"
    with pytest.raises(AnonymizationRefused) as refused:
        run(make_dataset(PatientID="NOT-LISTED"))
    assert refused.value.reason == "lookup-missing"
    assert "NOT-LISTED" not in refused.value.detail  # details are logged: no patient IDs


def test_round_age() -> None:
    run = only(Rule("PatientAge", "round-age", step=10))
    assert run(make_dataset()).PatientAge == "040Y"
    assert run(make_dataset(PatientAge="093Y")).PatientAge == "090Y"
    assert run(make_dataset(PatientAge="011M")).PatientAge == "011M"
    assert only(Rule("PatientAge", "round-age"))(make_dataset()).PatientAge == "045Y"


def test_year_only() -> None:
    out = only(Rule("StudyDate", "year-only"), Rule("AcquisitionDateTime", "year-only"))(
        make_dataset()
    )
    assert out.StudyDate == "20240101"
    assert out.AcquisitionDateTime == "2024"


# --- selectors and order --------------------------------------------------------------------


def test_selectors_tag_pattern_group_vr_and_private_creator() -> None:
    out = only(
        Rule("(0019,xx23)@GEMS_ACQU_01", "keep"),
        Rule("(0009,xxxx)", "remove"),
        Rule("group:curves", "remove"),
        Rule("group:overlays", "remove"),
        Rule("(0010,0010)", "set", value="BY^TAG"),
        Rule("vr:PN", "empty"),
    )(make_dataset())
    assert not any(e.tag.group == 0x0009 for e in out)
    assert not any(e.tag.group in (0x5000, 0x6000) for e in out)
    assert out.PatientName == "BY^TAG"
    assert out.ReferringPhysicianName == ""
    # Nested elements are matched too.
    assert out.RequestAttributesSequence[0].ContentSequence[0].PersonName == ""
    assert out[0x00191023].value == "27.5"


def test_kept_private_text_is_scanned_even_as_unknown_implicit_vr() -> None:
    ds = make_dataset()
    implicit = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    dcmwrite(implicit, ds, enforce_file_format=True)
    implicit.seek(0)
    engine = anonymizer(
        profile=ProfileOptions(remove_private=False, retain_longitudinal="off"),
    )
    with pytest.raises(AnonymizationRefused) as refused:
        engine.anonymize(dcmread(implicit))
    assert refused.value.reason == "residual-phi" and "(0009,1001)" in refused.value.detail


def test_replacement_uid_predicts_the_archived_uid() -> None:
    engine = anonymizer(profile=ProfileOptions())
    out = engine.anonymize(make_dataset()).dataset
    assert engine.replacement_uid(ORIGINAL_SOP) == out.SOPInstanceUID
    assert engine.replacement_uid(ORIGINAL_STUDY, "StudyInstanceUID") == out.StudyInstanceUID
    kept = anonymizer(profile=ProfileOptions(retain_uids=True))
    assert kept.replacement_uid(ORIGINAL_SOP) == ORIGINAL_SOP


def test_first_matching_rule_wins() -> None:
    out = only(Rule("PatientName", "set", value="FIRST"), Rule("vr:PN", "remove"))(make_dataset())
    assert out.PatientName == "FIRST"
    assert "ReferringPhysicianName" not in out


def test_nested_uids_are_replaced_at_every_depth_and_references_resolve() -> None:
    keys = Keys(SECRET)
    referenced = make_dataset(SOPInstanceUID=REFERENCED_SOP)
    engine = anonymizer(profile=ProfileOptions())
    target = engine.anonymize(referenced).dataset
    source = engine.anonymize(make_dataset()).dataset
    reference = source.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert reference == target.SOPInstanceUID == keys.uid(REFERENCED_SOP)
    assert source.StudyInstanceUID == target.StudyInstanceUID == keys.uid(ORIGINAL_STUDY)


# --- the profile and its options ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "removed"),
    [
        ((), "YES"),
        # An option keeps characteristics (sex, age), never who the patient is.
        ((Rule("PatientSex", "keep"), Rule("PatientAge", "keep")), "YES"),
        ((Rule("PatientName", "keep"),), "NO"),
        ((Rule("PatientID", "keep"),), "NO"),
        ((Rule("PatientBirthDate", "keep"),), "NO"),
        # Replaced, not kept: the identity is gone.
        ((Rule("PatientID", "pseudonym"),), "YES"),
    ],
)
def test_patient_identity_removed_says_no_when_a_rule_keeps_the_identity(
    rules: tuple[Rule, ...], removed: str
) -> None:
    engine = anonymizer(rules, profile=ProfileOptions(retain_longitudinal="off"))
    out = roundtrip(engine.anonymize(make_dataset()).dataset)
    assert out.PatientIdentityRemoved == removed


def test_basic_profile_without_options() -> None:
    out = basic()
    assert out.PatientIdentityRemoved == "YES"
    assert codes(out) == {"113100"}
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert "PatientAge" not in out and "StudyDescription" not in out
    assert out.PatientName == "" and out.PatientSex == "" and out.StudyDate == ""
    assert out.AccessionNumber == ""
    assert out.SOPInstanceUID != ORIGINAL_SOP
    assert out.InstitutionName == "ANONYMIZED" and out.StationName == "ANONYMIZED"
    assert not any(e.tag.is_private for e in out.iterall())
    assert not any(e.tag.group in (0x5000,) for e in out)
    assert 0x60003000 not in out  # overlay data
    assert out.PixelData == PIXELS
    assert "DeidentificationMethod" in out


def test_private_with_identifying_text_is_refused_when_not_removed() -> None:
    engine = anonymizer(profile=ProfileOptions(remove_private=False, retain_longitudinal="off"))
    with pytest.raises(AnonymizationRefused) as refused:
        engine.anonymize(make_dataset())
    assert refused.value.reason == "residual-phi"
    assert "(0009,1001)" in refused.value.detail


def test_option_retain_safe_private() -> None:
    out = basic(retain_safe_private=True)
    assert out[0x00191023].value == "27.5"
    assert out[0x00190010].value == "GEMS_ACQU_01"  # its creator stays with it
    assert 0x00091001 not in out and 0x00090010 not in out
    assert "113111" in codes(out)


def test_option_retain_uids() -> None:
    out = basic(retain_uids=True)
    assert out.SOPInstanceUID == ORIGINAL_SOP and out.StudyInstanceUID == ORIGINAL_STUDY
    assert "113110" in codes(out)
    assert basic().SOPInstanceUID != ORIGINAL_SOP


def test_option_retain_device_identity() -> None:
    out = basic(retain_device_identity=True)
    assert out.StationName == "CTSCANNER7" and out.DeviceSerialNumber == "SN4711"
    assert "113109" in codes(out)


def test_option_retain_institution_identity() -> None:
    out = basic(retain_institution_identity=True)
    assert out.InstitutionName == "Saint Elsewhere Hospital"
    assert out.InstitutionAddress == "1 Main Street, Springfield"
    assert "113112" in codes(out)
    assert "InstitutionAddress" not in basic()


def test_option_retain_patient_characteristics() -> None:
    out = basic(retain_patient_characteristics=True)
    assert out.PatientSex == "M" and out.PatientAge == "047Y"
    assert float(out.PatientWeight) == 81.5 and float(out.PatientSize) == 1.8
    assert "113108" in codes(out)
    assert out.PatientName == "" and out.PatientBirthDate == ""


def test_option_retain_longitudinal_full_dates() -> None:
    out = basic(retain_longitudinal="full")
    assert out.StudyDate == "20240115" and out.StudyTime == "101500"
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert "113106" in codes(out)
    assert out.PatientBirthDate == ""  # not part of the option


def test_option_retain_longitudinal_modified_dates() -> None:
    out = basic(retain_longitudinal="modified")
    days = Keys(SECRET).date_shift_days("PAT12345", 3650)
    assert out.StudyDate == (date(2024, 1, 15) - timedelta(days=days)).strftime("%Y%m%d")
    assert out.SeriesDate == out.StudyDate
    assert out.StudyTime == "101500"  # a day shift keeps the time of day
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in codes(out)


def test_option_clean_descriptors() -> None:
    out = basic(clean_descriptors=True)
    assert out.StudyDescription == "CT chest for"
    assert out.SeriesDescription == "Axial 1mm"
    assert out.ImageComments == "checked by"
    assert "113105" in codes(out)


def test_default_rule_set_pseudonymizes_patient_and_shifts_dates() -> None:
    engine = RuleAnonymizer(default_rule_set(), Keys(SECRET), version=1)
    out = engine.anonymize(make_dataset()).dataset
    assert out.PatientID.startswith("SUBJ") and out.PatientName == out.PatientID
    assert out.StudyDate not in ("", "20240115")
    assert codes(out) == {"113100", "113107"}
    assert engine.anonymize(make_dataset()).ruleset_version == 1


# --- safety nets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"BurnedInAnnotation": "YES"}, "Burned In Annotation"),
        ({"Modality": "US"}, "modality US"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class"),
        # Encapsulated PDF and CDA: text the residual-PHI check cannot read.
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "SOP class"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.2"}, "SOP class"),
    ],
)
def test_burned_in_annotation_is_refused_unless_allowed(
    changes: dict[str, object], why: str
) -> None:
    with pytest.raises(AnonymizationRefused) as refused:
        anonymizer(profile=ProfileOptions()).anonymize(make_dataset(**changes))
    assert refused.value.reason == "burned-in-annotation"
    assert why in refused.value.detail
    allowed = anonymizer(profile=ProfileOptions(), quarantine_burned_in=False)
    assert allowed.anonymize(make_dataset(**changes)).dataset.PatientName == ""


def test_burned_in_modalities_come_from_settings() -> None:
    engine = anonymizer(profile=ProfileOptions(), burned_in_modalities=("CT",))
    with pytest.raises(AnonymizationRefused):
        engine.anonymize(make_dataset())
    assert anonymizer(profile=ProfileOptions(), burned_in_modalities=()).anonymize(
        make_dataset(Modality="US")
    )


def test_burned_in_sop_classes_come_from_settings() -> None:
    engine = anonymizer(profile=ProfileOptions(), burned_in_sop_classes=(CTImageStorage,))
    with pytest.raises(AnonymizationRefused, match="SOP class"):
        engine.anonymize(make_dataset())
    secondary = make_dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    assert anonymizer(profile=ProfileOptions(), burned_in_sop_classes=()).anonymize(secondary)


def test_residual_phi_in_free_text_is_refused_naming_the_element() -> None:
    engine = anonymizer(tuple(r for r in SCRUB if r.match != "StudyDescription"))
    with pytest.raises(AnonymizationRefused) as refused:
        engine.anonymize(make_dataset())
    assert refused.value.reason == "residual-phi"
    assert "StudyDescription" in refused.value.detail
    assert "Johnathan" not in refused.value.detail


def test_residual_phi_is_found_at_any_depth() -> None:
    rules = (
        Rule("vr:PN", "empty"),
        Rule("StudyDescription", "remove"),
        Rule("ImageComments", "remove"),
        Rule("(0009,xxxx)", "remove"),
        Rule("AccessionNumber", "empty"),
        Rule("InstitutionName", "remove"),
        Rule("InstitutionAddress", "remove"),
        Rule("PatientID", "remove"),
        Rule("PatientBirthDate", "remove"),
        Rule("StationName", "remove"),
        Rule("StudyID", "remove"),
    )
    with pytest.raises(AnonymizationRefused) as refused:
        anonymizer(rules).anonymize(make_dataset())
    assert "RequestAttributesSequence[0] > RequestedProcedureID" in refused.value.detail
    # Once the nested value is dealt with too, the instance passes.
    rules += (Rule("RequestedProcedureID", "empty"),)
    assert anonymizer(rules).anonymize(make_dataset())


def test_an_invalid_rule_set_is_never_applied() -> None:
    with pytest.raises(RuleSetInvalid):
        anonymizer((Rule("PatientName", "shift-date"),))


def test_pixel_data_is_never_read_when_deferred() -> None:
    ds = roundtrip(make_dataset(), defer_size=64)
    out = anonymizer(profile=ProfileOptions()).anonymize(ds).dataset
    raw = out.get_item(0x7FE00010, keep_deferred=True)
    assert raw is not None and raw.value is None  # still deferred: never loaded or changed
    assert out.PatientName == ""


# --- dry run --------------------------------------------------------------------------------


def test_dry_run_lists_before_after_and_rule_without_changing_the_data() -> None:
    ds = make_dataset()
    engine = RuleAnonymizer(default_rule_set(), Keys(SECRET))
    report = engine.dry_run(ds)
    assert ds.PatientName == "Doe^Johnathan"  # the input is untouched
    assert report.refused is None
    by_path = {c.path: c for c in report.changes}
    name = by_path["PatientName"]
    assert name.before == "Doe^Johnathan" and name.after.startswith("SUBJ")
    assert name.action == "pseudonym" and name.rule.startswith("rule 2")
    age = by_path["PatientAge"]
    assert age.after is None and "E.1-1 X" in age.rule
    nested = by_path["ReferencedImageSequence[0] > ReferencedSOPInstanceUID"]
    assert nested.before == REFERENCED_SOP and nested.after == Keys(SECRET).uid(REFERENCED_SOP)
    assert by_path["Modality"].action == "keep" and not by_path["Modality"].changed
    assert by_path["PatientIdentityRemoved"].after == "YES"


def test_dry_run_reports_a_refusal_and_still_shows_the_rules() -> None:
    report = RuleAnonymizer(default_rule_set(), Keys(SECRET)).dry_run(make_dataset(Modality="US"))
    assert report.refused is not None and report.refused.reason == "burned-in-annotation"
    assert any(c.path == "PatientName" and c.changed for c in report.changes)
