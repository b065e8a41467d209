"""Rule sets as data: validation, TOML round trip, versions in the database, the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import SettingsFactory
from tests.engine.test_anonymize import make_dataset
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.anonymize import RuleAnonymizer
from webaims_tui.engine.profile import default_rule_set
from webaims_tui.engine.rules import (
    ProfileOptions,
    Rule,
    RuleSet,
    RuleSetInvalid,
    dumps,
    loads,
    parse_selector,
    validate,
)
from webaims_tui.engine.service import Engine

COMPLEX = RuleSet(
    name='trial "X" set',
    description='multi\nline "description" with \\ and ünïcode',
    rules=(
        Rule("PatientID", "lookup", table="subjects", comment="from the trial list"),
        Rule("PatientName", "pseudonym", key="PatientID", prefix="TRIAL"),
        Rule("(0009,xxxx)", "remove"),
        Rule("(0019,xx23)@GEMS_ACQU_01", "keep"),
        Rule("group:overlays", "remove"),
        Rule("vr:PN", "empty"),
        Rule("PatientAge", "round-age", step=10),
        Rule("StudyDate", "year-only"),
        Rule("Rows", "set", value="512"),
    ),
    profile=ProfileOptions(
        retain_uids=True,
        clean_descriptors=True,
        retain_longitudinal="full",
        safe_private=("(0019,xx23)@GEMS_ACQU_01",),
    ),
    lookup={"subjects": {"PAT-1": "S-001", 'odd key = "x"': "S-002"}},
)


def reasons(rule_set: RuleSet) -> list[str]:
    return [str(error) for error in validate(rule_set)]


# --- selectors and validation ---------------------------------------------------------------


def test_selectors_parse() -> None:
    assert parse_selector("PatientName").value == 0x00100010
    assert parse_selector("(0010,0010)").value == 0x00100010
    pattern = parse_selector("(50xx,xxxx)")
    assert pattern.matches(0x50020030, "OB", None) and not pattern.matches(0x60000010, "US", None)
    private = parse_selector("(0019,xx23)@GEMS_ACQU_01")
    assert private.matches(0x00191023, "DS", "GEMS_ACQU_01")
    assert not private.matches(0x00191023, "DS", "OTHER")
    assert parse_selector("group:private").matches(0x00091001, "LO", None)
    assert parse_selector("vr:pn").vr == "PN"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (Rule("PatientNmae", "remove"), "unknown keyword 'PatientNmae'"),
        (Rule("(0010,001)", "remove"), "malformed tag '(0010,001)'"),
        (Rule("(00zz,0010)", "remove"), "malformed tag"),
        (Rule("group:secrets", "remove"), "unknown group 'secrets'"),
        (Rule("vr:XX", "remove"), "unknown VR 'XX'"),
        (Rule("PatientName", "shift-date"), "action 'shift-date' is not valid for VR PN"),
        (Rule("StudyDate", "round-age"), "not valid for VR DA"),
        (Rule("PatientName", "uid"), "not valid for VR PN"),
        (Rule("vr:PN", "year-only"), "not valid for VR PN"),
        (Rule("PatientID", "lookup", table="nowhere"), "lookup table 'nowhere' does not exist"),
        (Rule("PatientID", "lookup"), "needs a table"),
        (Rule("PatientName", "set"), "needs a value"),
        (Rule("StudyDate", "set", value="15/01/2024"), "not a DICOM date"),
        (Rule("PatientName", "obliterate"), "unknown action 'obliterate'"),
        (Rule("PatientName", "pseudonym", key="Nonsense"), "unknown keyword 'Nonsense'"),
        (Rule("PixelData", "remove"), "pixel data is never changed"),
        (Rule("PatientAge", "round-age", step=0), "between 1 and 100"),
    ],
)
def test_validation_names_the_rule_and_the_reason(rule: Rule, expected: str) -> None:
    rule_set = RuleSet(name="bad", rules=(Rule("PatientID", "keep"), rule))
    problems = reasons(rule_set)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"rule 2 (match = {rule.match!r}")
    assert expected in problems[0]


def test_profile_options_are_validated() -> None:
    problems = reasons(
        RuleSet(
            name="bad",
            profile=ProfileOptions(
                name="hipaa", retain_longitudinal="sometimes", safe_private=("PatientName",)
            ),
        )
    )
    assert any(p.startswith("profile.name") for p in problems)
    assert any(p.startswith("profile.retain_longitudinal") for p in problems)
    assert any("profile.safe_private" in p for p in problems)


def test_toml_errors_name_the_place() -> None:
    text = """
name = "broken"
colour = "blue"

[profile]
retain_uids = "yes"
favourite = 1

[[rules]]
match = "PatientName"
action = "shift-date"

[[rules]]
action = "remove"
"""
    with pytest.raises(RuleSetInvalid) as invalid:
        loads(text)
    message = str(invalid.value)
    assert "colour: unknown key" in message
    assert "profile.retain_uids" in message and "profile.favourite: unknown option" in message
    assert "rule 2: 'match' is required" in message
    with pytest.raises(RuleSetInvalid) as invalid:
        loads('name = "x"\n[[rules]]\nmatch = "PatientName"\naction = "shift-date"\n')
    assert "rule 1 (match = 'PatientName', action = 'shift-date')" in str(invalid.value)
    with pytest.raises(RuleSetInvalid, match="invalid TOML"):
        loads("name = ")


def test_default_rule_set_is_valid() -> None:
    assert validate(default_rule_set()) == []


# --- TOML -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_set", [COMPLEX, default_rule_set(), RuleSet(name="bare")])
def test_toml_round_trip(rule_set: RuleSet) -> None:
    text = dumps(rule_set)
    assert loads(text) == rule_set
    assert dumps(loads(text)) == text


def test_toml_is_readable() -> None:
    text = dumps(COMPLEX)
    assert '[[rules]]\nmatch = "PatientID"\naction = "lookup"\ntable = "subjects"' in text
    assert "[lookup.subjects]" in text
    assert 'retain_longitudinal = "full"' in text


# --- versions in the database ---------------------------------------------------------------


@pytest.fixture
def opened(make_settings: SettingsFactory) -> Iterator[Engine]:
    engine = Engine(make_settings())
    engine.open()
    yield engine
    engine.stop()


def test_a_new_archive_starts_with_the_default_set_active(opened: Engine) -> None:
    assert opened.rule_sets() == []
    anonymizer = opened.make_anonymizer()
    stored = opened.rule_sets()
    assert [(s.name, s.version, s.active) for s in stored] == [("default", 1, True)]
    assert anonymizer.version == stored[0].id
    assert anonymizer.anonymize(make_dataset()).ruleset_version == stored[0].id
    # Once stored, it is not stored again.
    opened.make_anonymizer()
    assert len(opened.rule_sets()) == 1


def test_versions_activation_and_export(opened: Engine) -> None:
    first = opened.save_rule_set(COMPLEX, comment="first")
    second = opened.save_rule_set(dumps(COMPLEX), comment="again")
    assert (first.version, second.version) == (1, 2)
    assert not first.active and not second.active
    active = opened.activate_rule_set(COMPLEX.name, version=1)
    assert active.active and active.version == 1
    rule_set, row = opened.rule_set(COMPLEX.name)
    assert rule_set == COMPLEX and row.version == 2
    assert opened.rule_set_text(COMPLEX.name, 1) == dumps(COMPLEX)
    anonymizer = opened.make_anonymizer()
    assert anonymizer.version == first.id
    opened.activate_rule_set(COMPLEX.name)
    with db.database.connection_context():
        assert db.RuleSet.select().where(db.RuleSet.active == True).count() == 1  # noqa: E712


def test_an_invalid_set_is_never_stored_or_activated(opened: Engine) -> None:
    bad = RuleSet(name="bad", rules=(Rule("PatientName", "shift-date"),))
    with pytest.raises(RuleSetInvalid):
        opened.save_rule_set(bad)
    assert opened.rule_sets() == []
    # A row made invalid behind our back (an older program, a hand edit) cannot be activated.
    with db.database.connection_context():
        db.RuleSet.create(name="bad", version=1, toml=dumps(bad))
    with pytest.raises(RuleSetInvalid):
        opened.activate_rule_set("bad")
    with db.database.connection_context():
        assert db.RuleSet.select().where(db.RuleSet.active == True).count() == 0  # noqa: E712


def test_engine_dry_run_with_a_chosen_set(opened: Engine, tmp_path: Path) -> None:
    path = tmp_path / "instance.dcm"
    make_dataset().save_as(path)
    report = opened.dry_run(path, RuleSet(name="k", rules=(Rule("vr:PN", "keep"),)))
    assert report.rule_set == "k"
    names = [c for c in report.changes if c.path == "PatientName"]
    assert names[0].action == "keep" and names[0].after == "Doe^Johnathan"
    assert dcmread(path).PatientName == "Doe^Johnathan"


def test_anonymizer_from_a_stored_set_is_picklable(opened: Engine) -> None:
    import pickle

    anonymizer = opened.make_anonymizer()
    copy = pickle.loads(pickle.dumps(anonymizer))
    assert isinstance(copy, RuleAnonymizer)
    assert (
        copy.anonymize(make_dataset()).dataset.PatientID
        == anonymizer.anonymize(make_dataset()).dataset.PatientID
    )


# --- the commands ---------------------------------------------------------------------------


def test_rules_commands(
    make_settings: SettingsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    common = ["--config", str(settings.config_file), "--data-dir", str(settings.paths.data_dir)]
    assert main(["rules", "list", *common]) == 0
    assert "default" in capsys.readouterr().out
    assert main(["rules", "export", "default", *common]) == 0
    exported = capsys.readouterr().out
    assert loads(exported) == default_rule_set()

    good = tmp_path / "trial.toml"
    good.write_text(dumps(COMPLEX))
    assert main(["rules", "import", str(good), "--comment", "v1", *common]) == 0
    assert "version 1" in capsys.readouterr().out
    assert main(["rules", "activate", COMPLEX.name, *common]) == 0
    assert main(["rules", "list", *common]) == 0
    listing = capsys.readouterr().out
    assert f"* {COMPLEX.name}" in listing

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[rules]]\nmatch = "PatientNmae"\naction = "remove"\n')
    assert main(["rules", "import", str(bad), *common]) == 1
    assert "rule 1 (match = 'PatientNmae', action = 'remove'): unknown keyword" in (
        capsys.readouterr().err
    )
    assert main(["rules", "activate", "nothing", *common]) == 1
    assert main(["rules", "export", "nothing", *common]) == 1


def test_anonymize_dry_run_command(
    make_settings: SettingsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    common = ["--config", str(settings.config_file), "--data-dir", str(settings.paths.data_dir)]
    path = tmp_path / "instance.dcm"
    make_dataset().save_as(path)
    assert main(["anonymize", "--dry-run", str(path), *common]) == 0
    out = capsys.readouterr().out
    assert "PatientName" in out and "pseudonym" in out and "by rule 2" in out
    assert "PS3.15 E.1-1 X" in out
    rules_file = tmp_path / "keep.toml"
    rules_file.write_text(dumps(RuleSet(name="keep-names", rules=(Rule("vr:PN", "keep"),))))
    assert main(["anonymize", "--dry-run", str(path), "--rules", str(rules_file), *common]) == 0
    assert "rule set: keep-names" in capsys.readouterr().out
    assert main(["anonymize", "--dry-run", str(tmp_path / "missing.dcm"), *common]) == 1


def test_engine_checks_rule_sets_for_the_editor(opened: Engine) -> None:
    assert opened.check_rule_set(COMPLEX) == []
    assert opened.check_rule_set(dumps(COMPLEX)) == []
    errors = opened.check_rule_set('name = "x"\n[[rules]]\nmatch = "(0010,00)"\naction = "keep"\n')
    assert [e.where for e in errors] == ["rule 1 (match = '(0010,00)', action = 'keep')"]
    assert "malformed tag" in errors[0].reason
