"""Anonymization rule sets as data: the rule model, its TOML form and its validation.

A rule set is an ordered list of rules, the PS3.15 profile options and the lookup tables the
admin maintains. Each rule matches elements by one selector and applies one action; the first
rule that matches an element decides what happens to it, then the profile's rules (when the
set builds on the profile), then "keep". The text form is TOML, for example::

    name = "research"
    description = "Basic profile, shifted dates, subject IDs from the trial list"

    [profile]
    name = "basic"
    retain_longitudinal = "modified"

    [[rules]]
    match = "PatientID"
    action = "lookup"
    table = "subjects"

    [lookup.subjects]
    "PAT-0001" = "SUBJ-01"

Selectors (``match``): a keyword (``PatientName``), a tag (``(0010,0010)``), a tag pattern with
``x`` for any hex digit (``(0009,xxxx)``, ``(50xx,xxxx)``), a private element of a named creator
(``(0019,xx23)@GEMS_ACQU_01``), a group (``group:private``, ``group:curves``,
``group:overlays``) or a VR (``vr:PN``).

Nothing here touches a data set; :mod:`webaims_tui.engine.anonymize` compiles a validated set.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import peewee as pw
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.uid import UID

from webaims_tui.engine import db

#: The PS3.15 action codes, then this archive's own actions.
ACTIONS: tuple[str, ...] = (
    "remove",  # X
    "empty",  # Z
    "dummy",  # D
    "keep",  # K
    "clean",  # C
    "uid",  # U
    "set",
    "pseudonym",
    "shift-date",
    "lookup",
    "round-age",
    "year-only",
)

LONGITUDINAL_CHOICES: tuple[str, ...] = ("off", "full", "modified")
PROFILES: tuple[str, ...] = ("basic", "none")
GROUPS: tuple[str, ...] = ("private", "curves", "overlays")

_VR_NAMES = "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL"
ALL_VRS = frozenset((_VR_NAMES + " UN UR US UT UV").split(" "))
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_FREE_TEXT_VRS = frozenset({"LO", "SH", "PN", "UC", "LT", "ST", "UT"})

#: VRs an action can work on; an action missing here works on any VR.
ACTION_VRS: dict[str, frozenset[str]] = {
    "uid": frozenset({"UI"}),
    "shift-date": frozenset({"DA", "DT"}),
    "year-only": frozenset({"DA", "DT"}),
    "round-age": frozenset({"AS"}),
    "pseudonym": _FREE_TEXT_VRS,
    "lookup": _FREE_TEXT_VRS | {"AE", "CS"},
    "clean": _FREE_TEXT_VRS | {"SQ"},
    "set": ALL_VRS - {"SQ"},
}

#: A few well-known safe private attributes (PS3.15 table E.3.10-1) offered by default when the
#: Retain Safe Private option is switched on; the admin edits the list in the rule set.
DEFAULT_SAFE_PRIVATE: tuple[str, ...] = (
    "(0019,xx23)@GEMS_ACQU_01",  # Table Speed [mm/rotation]
    "(0019,xx24)@GEMS_ACQU_01",  # Mid Scan Time [sec]
    "(0019,xx27)@GEMS_ACQU_01",  # Rotation Speed [msec]
    "(0043,xx27)@GEMS_PARM_01",  # Scan Pitch Ratio
    "(0019,xx0C)@SIEMENS MR HEADER",  # B value
    "(0019,xx0D)@SIEMENS MR HEADER",  # Diffusion Directionality
    "(0019,xx0E)@SIEMENS MR HEADER",  # Diffusion Gradient Direction
    "(0019,xx27)@SIEMENS MR HEADER",  # B Matrix
    "(0043,xx39)@GEMS_PARM_01",  # Slop_int_6..9 (GE diffusion b value)
    "(2001,xx03)@Philips Imaging DD 001",  # Diffusion B-Factor
)


class RuleSetInvalid(Exception):
    """A rule set that must not be saved, activated or applied; ``errors`` says why."""

    def __init__(self, name: str, errors: list[RuleError]) -> None:
        lines = "\n".join(f"  {error}" for error in errors)
        super().__init__(f"rule set {name!r} is invalid:\n{lines}")
        self.name = name
        self.errors = errors


@dataclass(frozen=True)
class RuleError:
    """One problem: where (``rule 3 (match = 'PatientName')``, ``profile.safe_private``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class Rule:
    match: str
    action: str
    #: ``set``: the constant written.
    value: str | None = None
    #: ``lookup``: the name of the table in the rule set's ``lookup`` section.
    table: str | None = None
    #: ``pseudonym``: keyword of the element whose original value keys the pseudonym (default:
    #: the element itself), so that PatientName can carry the PatientID's pseudonym.
    key: str | None = None
    #: ``pseudonym``: text before the keyed hash.
    prefix: str | None = None
    #: ``round-age``: width of the age bins in years.
    step: int | None = None
    comment: str = ""

    def describe(self) -> str:
        return f"match = {self.match!r}, action = {self.action!r}"


@dataclass(frozen=True)
class ProfileOptions:
    """The PS3.15 Basic Application Level Confidentiality Profile and its option switches."""

    name: str = "basic"
    remove_private: bool = True
    retain_safe_private: bool = False
    safe_private: tuple[str, ...] = DEFAULT_SAFE_PRIVATE
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    #: "off" (dates removed or emptied per the profile), "full" (kept), "modified" (shifted by
    #: a per-patient offset that keeps intervals between one patient's studies).
    retain_longitudinal: str = "modified"
    clean_descriptors: bool = False
    #: Shifts are drawn from 1..date_shift_max_days days back.
    date_shift_max_days: int = 3650


@dataclass(frozen=True)
class RuleSet:
    name: str
    description: str = ""
    rules: tuple[Rule, ...] = ()
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    #: Lookup tables: table name -> original value -> replacement.
    lookup: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


# --- selectors ------------------------------------------------------------------------------

_TAG_RE = re.compile(r"^\(\s*([0-9A-Fa-fXx]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)$")


@dataclass(frozen=True)
class Selector:
    """A parsed ``match`` string. ``tag & mask == value`` for tags and patterns."""

    kind: str  # "tag", "pattern", "private", "group", "vr"
    text: str
    value: int = 0
    mask: int = 0xFFFFFFFF
    group: str = ""
    vr: str = ""
    creator: str = ""

    @property
    def dictionary_vr(self) -> str | None:
        """The VR of the one element this selects, when the dictionary knows it."""
        if self.kind == "vr":
            return self.vr
        if self.kind != "tag":
            return None
        try:
            return str(dictionary_VR(self.value))
        except KeyError:
            return None

    def matches(self, tag: int, vr: str, creator: str | None) -> bool:
        kind = self.kind
        if kind == "tag" or kind == "pattern":
            return tag & self.mask == self.value
        if kind == "private":
            return tag & self.mask == self.value and creator == self.creator
        if kind == "vr":
            return vr == self.vr
        group = tag >> 16
        if self.group == "private":
            return bool(group & 1)
        if self.group == "curves":
            return group & 0xFF01 == 0x5000
        return group & 0xFF01 == 0x6000  # overlays: even groups 6000-60FE


def parse_selector(text: str) -> Selector:
    """Parse a ``match`` string; ValueError with a readable reason when it is malformed."""
    text = text.strip()
    if text.startswith("group:"):
        name = text.removeprefix("group:")
        if name not in GROUPS:
            raise ValueError(f"unknown group {name!r} (known: {', '.join(GROUPS)})")
        return Selector(kind="group", text=text, group=name)
    if text.startswith("vr:"):
        vr = text.removeprefix("vr:").upper()
        if vr not in ALL_VRS:
            raise ValueError(f"unknown VR {vr!r}")
        return Selector(kind="vr", text=text, vr=vr)
    if text.startswith("("):
        tag_text, _, creator = text.partition("@")
        found = _TAG_RE.match(tag_text.strip())
        if not found:
            raise ValueError(f"malformed tag {tag_text.strip()!r}: expected (gggg,eeee)")
        digits = (found.group(1) + found.group(2)).upper()
        value = mask = 0
        for digit in digits:
            value <<= 4
            mask <<= 4
            if digit != "X":
                value |= int(digit, 16)
                mask |= 0xF
        if creator:
            group = value >> 16
            if not group & 1 or mask >> 16 != 0xFFFF:
                raise ValueError("a private creator needs an odd, exact group: (gggg,xxee)@CREATOR")
            if mask & 0xFFFF != 0x00FF:
                raise ValueError("a creator's element is written xxee: (gggg,xxee)@CREATOR")
            return Selector(kind="private", text=text, value=value, mask=mask, creator=creator)
        if mask == 0xFFFFFFFF:
            return Selector(kind="tag", text=text, value=value)
        return Selector(kind="pattern", text=text, value=value, mask=mask)
    if text in keyword_dict:
        return Selector(kind="tag", text=text, value=keyword_dict[text])
    raise ValueError(f"unknown keyword {text!r}")


# --- validation -----------------------------------------------------------------------------


def validate(rule_set: RuleSet) -> list[RuleError]:
    """Every problem of ``rule_set``; an empty list means it can be saved, activated, applied."""
    errors: list[RuleError] = []
    if not rule_set.name.strip():
        errors.append(RuleError("name", "must not be empty"))
    for number, rule in enumerate(rule_set.rules, start=1):
        where = f"rule {number} ({rule.describe()})"
        errors += [RuleError(where, reason) for reason in _rule_problems(rule, rule_set)]
    errors += _profile_problems(rule_set.profile)
    for table, entries in rule_set.lookup.items():
        for original, replacement in entries.items():
            if not isinstance(original, str) or not isinstance(replacement, str):
                errors.append(RuleError(f"lookup.{table}", "entries must map text to text"))
                break
    return errors


def check(rule_set: RuleSet) -> RuleSet:
    """``rule_set`` itself when valid; otherwise :class:`RuleSetInvalid`."""
    errors = validate(rule_set)
    if errors:
        raise RuleSetInvalid(rule_set.name, errors)
    return rule_set


def _rule_problems(rule: Rule, rule_set: RuleSet) -> list[str]:
    problems: list[str] = []
    if rule.action not in ACTIONS:
        return [f"unknown action {rule.action!r} (known: {', '.join(ACTIONS)})"]
    try:
        selector = parse_selector(rule.match)
    except ValueError as exc:
        return [str(exc)]
    if selector.kind == "tag" and selector.value in _PIXEL_TAGS and rule.action != "keep":
        problems.append("pixel data is never changed by a rule")
    vr = selector.dictionary_vr
    allowed = ACTION_VRS.get(rule.action)
    if vr is not None and allowed is not None:
        # The dictionary writes ambiguous VRs as "US or SS": the action must fit one of them.
        candidates = {part.strip() for part in vr.split(" or ")}
        if not candidates & allowed:
            problems.append(f"action {rule.action!r} is not valid for VR {vr}")
    if rule.action == "set":
        if rule.value is None:
            problems.append("action 'set' needs a value")
        elif vr is not None:
            problem = value_problem(rule.value, vr)
            if problem:
                problems.append(problem)
    elif rule.value is not None:
        problems.append(f"'value' is only used by action 'set', not {rule.action!r}")
    if rule.action == "lookup":
        if not rule.table:
            problems.append("action 'lookup' needs a table")
        elif rule.table not in rule_set.lookup:
            problems.append(f"lookup table {rule.table!r} does not exist in this rule set")
    elif rule.table is not None:
        problems.append("'table' is only used by action 'lookup'")
    if rule.key is not None:
        if rule.action != "pseudonym":
            problems.append("'key' is only used by action 'pseudonym'")
        elif rule.key not in keyword_dict:
            problems.append(f"unknown keyword {rule.key!r} for the pseudonym key")
    if rule.prefix is not None and rule.action != "pseudonym":
        problems.append("'prefix' is only used by action 'pseudonym'")
    if rule.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]{0,16}", rule.prefix):
        problems.append("a pseudonym prefix is up to 16 letters, digits, '-' or '_'")
    if rule.step is not None:
        if rule.action != "round-age":
            problems.append("'step' is only used by action 'round-age'")
        elif not 1 <= rule.step <= 100:
            problems.append("'step' must be between 1 and 100 years")
    return problems


def value_problem(value: str, vr: str) -> str | None:
    """Why ``value`` cannot be written to an element of ``vr`` (None when it can)."""
    vrs = {part.strip() for part in vr.split(" or ")}
    if vrs & {"DA"} and not re.fullmatch(r"(\d{8})?", value):
        return f"value {value!r} is not a DICOM date (YYYYMMDD)"
    if vrs & {"AS"} and not re.fullmatch(r"(\d{3}[DWMY])?", value):
        return f"value {value!r} is not a DICOM age (nnnD, nnnW, nnnM or nnnY)"
    if vrs & {"UI"} and value and not UID(value).is_valid:
        return f"value {value!r} is not a valid UID"
    if vrs & {"CS"} and not re.fullmatch(r"[A-Z0-9 _\\]{0,16}", value):
        return f"value {value!r} is not a code string (upper case, digits, space, _)"
    if vrs & {"US", "SS", "UL", "SL", "IS", "UV", "SV"} and not re.fullmatch(r"-?\d*", value):
        return f"value {value!r} is not an integer"
    if vrs & {"FL", "FD", "DS"}:
        try:
            float(value or "0")
        except ValueError:
            return f"value {value!r} is not a number"
    return None


def _profile_problems(profile: ProfileOptions) -> list[RuleError]:
    errors: list[RuleError] = []
    if profile.name not in PROFILES:
        errors.append(
            RuleError("profile.name", f"unknown profile {profile.name!r} (known: basic, none)")
        )
    if profile.retain_longitudinal not in LONGITUDINAL_CHOICES:
        errors.append(
            RuleError(
                "profile.retain_longitudinal",
                f"{profile.retain_longitudinal!r} is not one of {', '.join(LONGITUDINAL_CHOICES)}",
            )
        )
    if not 1 <= profile.date_shift_max_days <= 36500:
        errors.append(RuleError("profile.date_shift_max_days", "must be between 1 and 36500"))
    for entry in profile.safe_private:
        try:
            selector = parse_selector(entry)
        except ValueError as exc:
            errors.append(RuleError(f"profile.safe_private {entry!r}", str(exc)))
            continue
        if selector.kind != "private":
            errors.append(
                RuleError(
                    f"profile.safe_private {entry!r}",
                    "a safe private element is written (gggg,xxee)@CREATOR",
                )
            )
    return errors


# --- TOML -----------------------------------------------------------------------------------

_RULE_FIELDS = {f.name: f for f in fields(Rule)}
_PROFILE_FIELDS = {f.name: f for f in fields(ProfileOptions)}


def loads(text: str, source: str = "rule set") -> RuleSet:
    """Parse TOML text into a RuleSet; RuleSetInvalid for syntax, structure or rule errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleSetInvalid(source, [RuleError(source, f"invalid TOML ({exc})")]) from None
    errors: list[RuleError] = []
    name = raw.get("name")
    if not isinstance(name, str):
        errors.append(RuleError("name", 'missing: every rule set has a name = "..."'))
        name = source
    for key in raw:
        if key not in {"name", "description", "profile", "rules", "lookup"}:
            errors.append(RuleError(key, "unknown key"))
    description = raw.get("description", "")
    if not isinstance(description, str):
        errors.append(RuleError("description", "must be text"))
        description = ""
    rules: list[Rule] = []
    raw_rules = raw.get("rules", [])
    if not isinstance(raw_rules, list):
        errors.append(RuleError("rules", "must be an array of tables ([[rules]])"))
        raw_rules = []
    for number, entry in enumerate(raw_rules, start=1):
        rule, problems = _rule_from(entry)
        where = f"rule {number}" + (f" ({rule.describe()})" if rule else "")
        errors += [RuleError(where, problem) for problem in problems]
        if rule is not None:
            rules.append(rule)
    profile, profile_errors = _profile_from(raw.get("profile", {}))
    errors += profile_errors
    lookup: dict[str, dict[str, str]] = {}
    raw_lookup = raw.get("lookup", {})
    if not isinstance(raw_lookup, dict):
        errors.append(RuleError("lookup", "must be a table of tables ([lookup.NAME])"))
        raw_lookup = {}
    for table, entries in raw_lookup.items():
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            errors.append(RuleError(f"lookup.{table}", "must map text to text"))
            continue
        lookup[table] = dict(entries)
    if errors:
        raise RuleSetInvalid(name, errors)
    return check(
        RuleSet(
            name=name, description=description, rules=tuple(rules), profile=profile, lookup=lookup
        )
    )


def _rule_from(entry: Any) -> tuple[Rule | None, list[str]]:
    if not isinstance(entry, dict):
        return None, ["must be a table"]
    problems = [f"unknown key {key!r}" for key in entry if key not in _RULE_FIELDS]
    for required in ("match", "action"):
        if not isinstance(entry.get(required), str):
            problems.append(f"{required!r} is required and must be text")
    if problems:
        return None, problems
    values: dict[str, Any] = {}
    for key, value in entry.items():
        expected = int if key == "step" else str
        if key == "value" and isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `value = 70` for a numeric element reads naturally
        if not isinstance(value, expected) or isinstance(value, bool):
            problems.append(f"{key!r} must be {'an integer' if expected is int else 'text'}")
            continue
        values[key] = value
    return Rule(**values), problems


def _profile_from(raw: Any) -> tuple[ProfileOptions, list[RuleError]]:
    if not isinstance(raw, dict):
        return ProfileOptions(), [RuleError("profile", "must be a table ([profile])")]
    errors: list[RuleError] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _PROFILE_FIELDS:
            errors.append(RuleError(f"profile.{key}", "unknown option"))
            continue
        expected = type(_PROFILE_FIELDS[key].default)
        if expected is tuple:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[key] = tuple(value)
                continue
        elif isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
            values[key] = value
            continue
        errors.append(RuleError(f"profile.{key}", f"{value!r} is not a valid {expected.__name__}"))
    return ProfileOptions(**values), errors


def dumps(rule_set: RuleSet) -> str:
    """The rule set as readable TOML that :func:`loads` reads back to an equal RuleSet."""
    lines = [f"name = {_literal(rule_set.name)}"]
    if rule_set.description:
        lines.append(f"description = {_literal(rule_set.description)}")
    lines += ["", "[profile]"]
    for name, spec in _PROFILE_FIELDS.items():
        lines.append(f"{name} = {_literal(getattr(rule_set.profile, name))}")
        del spec
    for rule in rule_set.rules:
        lines += ["", "[[rules]]"]
        for name in _RULE_FIELDS:
            value = getattr(rule, name)
            if value is None or (name == "comment" and not value):
                continue
            lines.append(f"{name} = {_literal(value)}")
    for table, entries in rule_set.lookup.items():
        lines += ["", f"[lookup.{_key(table)}]"]
        lines += [f"{_key(original)} = {_literal(new)}" for original, new in entries.items()]
    return "\n".join(lines) + "\n"


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple | list):
        if not value:
            return "[]"
        return "[\n" + "".join(f"    {_literal(v)},\n" for v in value) + "]"
    text = str(value)
    escaped = "".join(
        {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, char)
        if char in '\\"\n\t\r' or ord(char) >= 0x20
        else f"\\u{ord(char):04x}"
        for char in text
    )
    return f'"{escaped}"'


def _key(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else _literal(text)


# --- rule sets in the archive database ------------------------------------------------------


@dataclass(frozen=True)
class StoredRuleSet:
    """One stored version of a named rule set (a row of the RuleSet table)."""

    id: int  # what Instance.ruleset_version refers to
    name: str
    version: int
    active: bool
    comment: str
    created_at: datetime


class RuleSetNotFound(LookupError):
    """No stored rule set of that name (and version)."""


@contextmanager
def _connected() -> Iterator[None]:
    """A connection for this thread; closed afterwards only if it was opened here, so that a
    caller inside a transaction (the autoloader) keeps its own."""
    opened = db.database.is_closed()
    if opened:
        db.database.connect()
    try:
        yield
    finally:
        if opened:
            db.database.close()


def _stored(row: db.RuleSet) -> StoredRuleSet:
    return StoredRuleSet(
        id=row.id,
        name=row.name,
        version=row.version,
        active=bool(row.active),
        comment=row.comment,
        created_at=row.created_at,
    )


def stored_rule_sets() -> list[StoredRuleSet]:
    """Every stored version, by name then version."""
    with _connected():
        query = db.RuleSet.select().order_by(db.RuleSet.name, db.RuleSet.version)
        return [_stored(row) for row in query]


def save_rule_set(rule_set: RuleSet, comment: str = "") -> StoredRuleSet:
    """Store ``rule_set`` as the next version of its name; RuleSetInvalid if it is invalid."""
    check(rule_set)
    text = dumps(rule_set)
    with _connected(), db.database.atomic():
        last = (
            db.RuleSet.select(pw.fn.MAX(db.RuleSet.version))
            .where(db.RuleSet.name == rule_set.name)
            .scalar()
        )
        row = db.RuleSet.create(
            name=rule_set.name, version=(last or 0) + 1, toml=text, active=False, comment=comment
        )
        return _stored(row)


def _row(name: str, version: int | None) -> db.RuleSet:
    query = db.RuleSet.select().where(db.RuleSet.name == name)
    if version is not None:
        query = query.where(db.RuleSet.version == version)
    row = query.order_by(db.RuleSet.version.desc()).first()
    if row is None:
        which = f"{name!r} version {version}" if version is not None else repr(name)
        raise RuleSetNotFound(f"no stored rule set {which}")
    return row


def load_stored_rule_set(name: str, version: int | None = None) -> tuple[RuleSet, StoredRuleSet]:
    """A stored rule set (the latest version unless ``version``), parsed and validated."""
    with _connected():
        row = _row(name, version)
    return loads(row.toml, source=f"{name} v{row.version}"), _stored(row)


def stored_rule_set_text(name: str, version: int | None = None) -> str:
    with _connected():
        return str(_row(name, version).toml)


def activate_rule_set(name: str, version: int | None = None) -> StoredRuleSet:
    """Make one stored version the active one, after validating it again."""
    with _connected(), db.database.atomic():
        row = _row(name, version)
        loads(row.toml, source=f"{name} v{row.version}")  # never activate what cannot apply
        db.RuleSet.update(active=False).where(db.RuleSet.active == True).execute()  # noqa: E712
        db.RuleSet.update(active=True).where(db.RuleSet.id == row.id).execute()
        row.active = True
        return _stored(row)


def active_rule_set(default: RuleSet) -> tuple[RuleSet, StoredRuleSet]:
    """The active rule set; on a new archive ``default`` is stored and activated first."""
    with _connected():
        row = db.RuleSet.select().where(db.RuleSet.active == True).first()  # noqa: E712
        if row is not None:
            return loads(row.toml, source=f"{row.name} v{row.version}"), _stored(row)
        with db.database.atomic():
            # Re-checked inside the transaction: two first starts must not both insert.
            row = db.RuleSet.select().where(db.RuleSet.active == True).first()  # noqa: E712
            if row is None:
                stored = save_rule_set(default, comment="built-in default")
                stored = activate_rule_set(stored.name, stored.version)
                return default, stored
        return loads(row.toml, source=f"{row.name} v{row.version}"), _stored(row)
