"""Anonymization: the contract with the autoloader, and the rule engine behind it.

The autoloader calls ``anonymizer.anonymize(dataset)`` on every instance before it is indexed and
archived. An anonymizer returns the anonymized dataset and the rule set version that produced it,
or raises :class:`AnonymizationRefused` when the instance must go to quarantine instead (a rule
that fails on it, residual identifying data, burned-in annotation).

:class:`RuleAnonymizer` applies a validated :class:`~webaims_tui.engine.rules.RuleSet`:

1. burned-in annotation check (refused before anything is changed);
2. the identifying values are noted (:mod:`webaims_tui.engine.phi`);
3. one pass over the elements, at every sequence depth: the first matching rule (the set's own
   rules, then the PS3.15 profile's, then "keep") decides each element's fate. Decisions are
   cached per (tag, VR[, private creator]), so the pass costs a dict lookup per element;
   elements that are kept are never decoded, and pixel data is never read or changed;
4. file meta and the de-identification attributes are updated;
5. the residual-PHI check scans every remaining text element.

The same pass, with a trace, is the dry run the CLI and the rule editor show.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from webaims_tui import locations
from webaims_tui.config import AnonymizationSettings, ConfigError, Settings
from webaims_tui.engine import phi, rules
from webaims_tui.engine.linkage import (
    Keys,
    Linkage,
    LinkEntry,
    load_or_create_site_secret,
    valid_uid_root,
)
from webaims_tui.engine.profile import default_rule_set, option_codes, profile_rules
from webaims_tui.engine.rules import Rule, RuleSet, Selector, check, parse_selector


@dataclass(frozen=True)
class AnonymizationResult:
    dataset: Dataset
    #: Primary key of the RuleSet row that anonymized the instance; None for pass-through.
    ruleset_version: int | None


#: The refusal reason (and quarantine folder) of an instance the residual-PHI check caught.
RESIDUAL_PHI = "residual-phi"


class AnonymizationRefused(Exception):
    """The instance must not be archived; ``reason`` names the quarantine folder.

    ``ruleset_version`` is the RuleSet row id of the stored rule set that refused, set by
    :meth:`RuleAnonymizer.anonymize` (None for a draft's dry run): the quarantine entry keeps it.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.ruleset_version: int | None = None


class Anonymizer(Protocol):
    def anonymize(self, dataset: Dataset) -> AnonymizationResult: ...


class PassThrough:
    """Leaves data unchanged: used until the rule engine is wired in."""

    def anonymize(self, dataset: Dataset) -> AnonymizationResult:
        return AnonymizationResult(dataset=dataset, ruleset_version=None)


# --- the rule engine ------------------------------------------------------------------------

#: Pixel data is never changed by a rule (the autoloader may not even have read it).
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

#: File meta elements that name the sending site.
_META_TO_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)

_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
_MAX_LENGTH = {"SH": 16, "LO": 64, "PN": 64, "AE": 16, "CS": 16, "UC": 1024, "LT": 10240}
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY: dict[str, object] = {
    "AE": _DUMMY_TEXT,
    "AS": "000Y",
    "CS": _DUMMY_TEXT,
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": "http://anonymized.invalid",
    "AT": 0,
}
_DEFAULT = -1  # decision index: no rule matched, the element is kept


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    selector: Selector
    #: "rule 2 (match = 'PatientID', action = 'pseudonym')" or "profile (0010,1000): PS3.15 X"
    label: str


@dataclass(frozen=True)
class ElementChange:
    """One element in a dry run: what it was, what it becomes, and which rule decided."""

    path: str  # "ReferencedImageSequence[0] > ReferencedSOPInstanceUID"
    tag: str  # "(0008,1155)"
    keyword: str
    vr: str
    action: str  # "keep", "remove", ... ("added" for attributes the profile writes)
    rule: str
    before: str | None  # None: the element was not there
    after: str | None  # None: the element is gone

    @property
    def changed(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class DryRunReport:
    rule_set: str
    changes: list[ElementChange]
    #: Set when the real run would quarantine the instance instead.
    refused: AnonymizationRefused | None = None


@dataclass
class _Context:
    """Per-instance state of one anonymization pass."""

    originals: dict[str, str]
    watchlist: phi.Watchlist
    trace: list[ElementChange] | None
    kept_identifying: list[str] = field(default_factory=list)
    #: A rule of the rule set (not a profile option) kept a value that names the patient.
    identity_kept: bool = False


class RuleAnonymizer:
    """Applies one validated rule set. Thread-safe for concurrent instances."""

    def __init__(
        self,
        rule_set: RuleSet,
        keys: Keys,
        settings: AnonymizationSettings | None = None,
        *,
        version: int | None = None,
        linkage: Linkage | None = None,
    ) -> None:
        self.rule_set = check(rule_set)  # an invalid set is never applied
        self.keys = keys
        self.settings = settings or AnonymizationSettings()
        self.version = version
        self.linkage = linkage
        self._rules = self._compile(rule_set)
        self._exact: dict[int, int] = {}
        self._others: list[tuple[int, Selector]] = []
        for index, compiled in enumerate(self._rules):
            selector = compiled.selector
            if selector.kind == "tag":
                self._exact.setdefault(selector.value, index)
            else:
                self._others.append((index, selector))
        self._needs_creator = any(s.kind == "private" for _, s in self._others)
        self._safe_creators = {
            (s.value >> 16, s.creator) for _, s in self._others if s.kind == "private"
        }
        self._decisions: dict[tuple[int, str, str | None], int] = {}
        # Keywords whose original top-level values rules need after the pass has changed them.
        self._original_keywords = {"PatientID"} | {
            r.rule.key for r in self._rules if r.rule.key is not None
        }
        self._codes = option_codes(rule_set.profile)
        self._uses_shift = any(r.rule.action == "shift-date" for r in self._rules)

    @staticmethod
    def _compile(rule_set: RuleSet) -> list[CompiledRule]:
        compiled = [
            CompiledRule(rule, parse_selector(rule.match), f"rule {n} ({rule.describe()})")
            for n, rule in enumerate(rule_set.rules, start=1)
        ]
        for rule in profile_rules(rule_set.profile):
            label = f"profile {rule.match}: {rule.comment}"
            compiled.append(CompiledRule(rule, parse_selector(rule.match), label))
        return compiled

    # --- public ------------------------------------------------------------------------------

    def anonymize(self, dataset: Dataset) -> AnonymizationResult:
        """Anonymize ``dataset`` in place; AnonymizationRefused when it must be quarantined."""
        try:
            self._run(dataset, trace=None)
        except AnonymizationRefused as refused:
            # Set here rather than at each raise: every refusal names the version behind it.
            refused.ruleset_version = self.version
            raise
        return AnonymizationResult(dataset=dataset, ruleset_version=self.version)

    def dry_run(self, dataset: Dataset) -> DryRunReport:
        """What :meth:`anonymize` would do to a copy of ``dataset``, element by element."""
        work = copy.deepcopy(dataset)
        trace: list[ElementChange] = []
        refused: AnonymizationRefused | None = None
        try:
            self._check_burned_in(work)
        except AnonymizationRefused as exc:
            # Still show what the rules would do: the editor is used on such files too.
            refused = exc
        try:
            self._run(work, trace=trace, record_linkage=False, check_burned_in=False)
        except AnonymizationRefused as exc:
            refused = refused or exc
        return DryRunReport(rule_set=self.rule_set.name, changes=trace, refused=refused)

    def close(self) -> None:
        """Release the linkage database connection (when this anonymizer is replaced)."""
        if self.linkage is not None:
            self.linkage.close()

    def replacement_uid(self, original: str, keyword: str = "SOPInstanceUID") -> str | None:
        """The UID this rule set writes for ``original`` in a top-level ``keyword`` element.

        Lets a caller find the archived copy of an instance from its original UID (a C-MOVE
        "what do we have already" check) without the linkage database: new UIDs are a keyed
        hash. None when the rule set removes, empties or sets that element.
        """
        index = self._decide(keyword_dict[keyword], "UI", None)
        action = "keep" if index == _DEFAULT else self._rules[index].rule.action
        if action in ("uid", "dummy"):
            return self.keys.uid(original)
        return original if action == "keep" else None

    # --- the pass ----------------------------------------------------------------------------

    def _run(
        self,
        dataset: Dataset,
        trace: list[ElementChange] | None,
        *,
        record_linkage: bool = True,
        check_burned_in: bool = True,
    ) -> None:
        if check_burned_in:
            self._check_burned_in(dataset)
        originals = {}
        for keyword in self._original_keywords:
            value = dataset.get(keyword)
            originals[keyword] = "" if value is None else str(value).strip()
        context = _Context(
            originals=originals, watchlist=phi.identifying_values(dataset), trace=trace
        )
        context_linkage = self.linkage if record_linkage else None
        self._apply(dataset, context, "", context_linkage)
        self._finish(dataset, context)
        watchlist = context.watchlist.discard(context.kept_identifying)
        hit = phi.find_residual(dataset, watchlist)
        if hit is not None:
            raise AnonymizationRefused(
                RESIDUAL_PHI,
                f"{hit.path} still holds the {hit.source} value after rule set "
                f"{self.rule_set.name!r}",
            )

    def _check_burned_in(self, dataset: Dataset) -> None:
        if not self.settings.quarantine_burned_in:
            return
        burned_in = str(dataset.get("BurnedInAnnotation", "")).strip().upper()
        modality = str(dataset.get("Modality", "")).strip().upper()
        sop_class = str(dataset.get("SOPClassUID", "")).strip()
        if burned_in == "YES":
            raise AnonymizationRefused("burned-in-annotation", "Burned In Annotation is YES")
        if modality and modality in self.settings.burned_in_modalities:
            raise AnonymizationRefused(
                "burned-in-annotation", f"modality {modality} may carry burned-in text"
            )
        if sop_class in self.settings.burned_in_sop_classes:
            raise AnonymizationRefused(
                "burned-in-annotation", f"SOP class {sop_class} may carry burned-in text"
            )

    def _decide(self, tag: int, vr: str, creator: str | None) -> int:
        key = (tag, vr, creator)
        decision = self._decisions.get(key)
        if decision is not None:
            return decision
        best = self._exact.get(tag, math.inf)
        for index, selector in self._others:
            if index >= best:
                break
            if selector.matches(tag, vr, creator):
                best = index
                break
        decision = _DEFAULT if best == math.inf else int(best)
        self._decisions[key] = decision
        return decision

    def _apply(
        self, dataset: Dataset, context: _Context, path: str, linkage: Linkage | None
    ) -> None:
        held_creators: list[int] = []
        for tag in list(dataset.keys()):
            raw = dataset.get_item(tag, keep_deferred=True)
            if raw is None:
                continue
            vr = raw.VR or _dictionary_vr(tag)
            if vr == "UN":
                # A known attribute sent as UN (implicit VR from a proxy) is still that attribute.
                vr = _dictionary_vr(tag)
            group = tag >> 16
            element_number = tag & 0xFFFF
            if tag in PIXEL_TAGS:
                self._trace_keep(context, path, tag, vr, raw, "pixel data (never changed)")
                continue
            if element_number == 0:
                # Group lengths are retired and would be wrong after changes.
                if context.trace is not None:
                    shown = _display_raw(raw, tag)
                    self._trace(context, path, tag, vr, "remove", "group length", shown, None)
                del dataset[tag]
                continue
            creator = None
            if group & 1 and self._needs_creator:
                if 0x0010 <= element_number <= 0x00FF:
                    name = _text(raw, dataset, tag)
                    if (group, name) in self._safe_creators:
                        held_creators.append(tag)
                        continue
                else:
                    creator = _creator_of(dataset, group, element_number)
            index = self._decide(tag, vr, creator)
            if index == _DEFAULT:
                action, compiled = "keep", None
            else:
                compiled = self._rules[index]
                action = compiled.rule.action
            if action == "keep":
                # Only a rule that keeps an identifying value on purpose (an option's K) exempts
                # it from the residual check; falling through to "keep" does not.
                if compiled is not None and tag in phi.IDENTIFYING_TAGS:
                    context.kept_identifying += phi.value_strings(dataset[tag].value)
                # The profile's options keep characteristics, never the patient's identity;
                # an admin's rule can: then the output must not claim the identity removed.
                user_rule = compiled is not None and index < len(self.rule_set.rules)
                if user_rule and tag in phi.PATIENT_IDENTITY_TAGS:
                    context.identity_kept = context.identity_kept or bool(dataset[tag].value)
                label = compiled.label if compiled else "no rule: kept"
                self._trace_keep(context, path, tag, vr, raw, label)
                if vr == "SQ":
                    self._recurse(dataset, tag, context, path, linkage)
                continue
            assert compiled is not None
            self._act(dataset, tag, vr, raw, compiled, context, path, linkage)
        # Iterating a Dataset would decode every element: walk its tags instead.
        remaining = list(dataset.keys())
        for creator_tag in held_creators:
            block = (creator_tag >> 16, (creator_tag & 0xFF) << 8)
            if any(t >> 16 == block[0] and (t & 0xFF00) == block[1] for t in remaining):
                self._trace_keep(
                    context,
                    path,
                    creator_tag,
                    "LO",
                    dataset.get_item(creator_tag),
                    "creator of a safe element",
                )
            else:
                shown = _display_raw(dataset.get_item(creator_tag), creator_tag)
                label = "creator of no kept element"
                self._trace(context, path, creator_tag, "LO", "remove", label, shown, None)
                del dataset[creator_tag]

    def _recurse(
        self, dataset: Dataset, tag: int, context: _Context, path: str, linkage: Linkage | None
    ) -> None:
        element = dataset[tag]
        name = element.keyword or _tag_text(tag)
        for number, item in enumerate(element.value or []):
            self._apply(item, context, f"{path}{name}[{number}] > ", linkage)

    def _act(
        self,
        dataset: Dataset,
        tag: int,
        vr: str,
        raw: DataElement | RawDataElement,
        compiled: CompiledRule,
        context: _Context,
        path: str,
        linkage: Linkage | None,
    ) -> None:
        rule = compiled.rule
        action = rule.action
        label = compiled.label
        before = _display(dataset, tag, raw) if context.trace is not None else None
        write_vr = vr.split(" or ")[0]
        if action == "remove":
            del dataset[tag]
            self._trace(context, path, tag, vr, action, label, before, None)
            return
        if action == "empty":
            dataset[tag] = DataElement(tag, write_vr, _empty_value(write_vr))
        elif action == "dummy":
            self._dummy(dataset, tag, write_vr)
        elif action == "clean":
            if vr == "SQ":
                self._trace(context, path, tag, vr, action, label, before, before)
                self._recurse(dataset, tag, context, path, linkage)
                return
            element = dataset[tag]
            element.value = _map_values(element.value, context.watchlist.clean)
        elif action == "uid":
            element = dataset[tag]
            element.value = _map_values(element.value, self.keys.uid)
        elif action == "set":
            dataset[tag] = DataElement(tag, write_vr, _typed(rule.value or "", write_vr))
        elif action == "pseudonym":
            self._pseudonym(dataset, tag, write_vr, rule, context, linkage)
        elif action == "lookup":
            element = dataset[tag]
            table = self.rule_set.lookup[rule.table or ""]

            def look_up(value: str) -> str:
                stripped = value.strip()
                if not stripped:
                    return value
                if stripped not in table:
                    raise AnonymizationRefused(
                        "lookup-missing",
                        f"{element.keyword or _tag_text(tag)}: the value is not in lookup table "
                        f"{rule.table!r} ({label})",
                    )
                return table[stripped]

            element.value = _map_values(element.value, look_up)
        elif action == "shift-date":
            days = self.keys.date_shift_days(
                context.originals.get("PatientID", ""), self.rule_set.profile.date_shift_max_days
            )
            element = dataset[tag]
            element.value = _map_values(element.value, lambda v: _shift(v, write_vr, days))
        elif action == "year-only":
            element = dataset[tag]
            element.value = _map_values(element.value, lambda v: _year_only(v, write_vr))
        elif action == "round-age":
            element = dataset[tag]
            step = rule.step or 5
            element.value = _map_values(element.value, lambda v: _round_age(v, step))
        if context.trace is not None:
            after = _display(dataset, tag, dataset.get_item(tag))
            self._trace(context, path, tag, vr, action, label, before, after)

    def _dummy(self, dataset: Dataset, tag: int, vr: str) -> None:
        if vr == "SQ":
            # D on a sequence: keep its items' structure, every value in them replaced.
            for item in dataset[tag].value or []:
                for inner in list(item.keys()):
                    raw = item.get_item(inner, keep_deferred=True)
                    if raw is None or inner in PIXEL_TAGS:
                        continue
                    inner_vr = (raw.VR or _dictionary_vr(inner)).split(" or ")[0]
                    self._dummy(item, inner, inner_vr)
            return
        if vr == "UI":
            element = dataset[tag]
            element.value = _map_values(element.value, self.keys.uid) if element.value else ""
            return
        value = _DUMMY.get(vr)
        if value is None:
            if vr in _STRING_VRS:
                value = _DUMMY_TEXT
            elif vr in ("FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"):
                value = 0
            else:
                value = b"\x00" * 8  # OB, OW, OF, OD, OL, OV, UN: a valid length for each
        dataset[tag] = DataElement(tag, vr, value)

    def _pseudonym(
        self,
        dataset: Dataset,
        tag: int,
        vr: str,
        rule: Rule,
        context: _Context,
        linkage: Linkage | None,
    ) -> None:
        element = dataset[tag]
        kind = rule.key or element.keyword or _tag_text(tag)
        if rule.key is not None:
            original = context.originals.get(rule.key, "")
        else:
            original = str(element.value or "").strip()
        if not original:
            dataset[tag] = DataElement(tag, vr, "")
            return
        prefix = rule.prefix or ""
        pseudonym = self.keys.pseudonym(f"{kind}\x00{original}", prefix)
        pseudonym = pseudonym[: _MAX_LENGTH.get(vr, 64)]
        if linkage is not None:
            linkage.record(kind, original, pseudonym)
        dataset[tag] = DataElement(tag, vr, pseudonym)

    def _finish(self, dataset: Dataset, context: _Context) -> None:
        """File meta and the de-identification attributes (PS3.15 E.1.1 item 6)."""
        meta = getattr(dataset, "file_meta", None)
        if meta is not None:
            if "SOPInstanceUID" in dataset:
                meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            for tag in _META_TO_REMOVE:
                if tag in meta:
                    del meta[tag]
        before = {tag: _display(dataset, tag, dataset.get_item(tag)) for tag in _ADDED_TAGS}
        # PS3.3 C.7.1.1: YES only when the patient's identity really is gone.
        dataset.PatientIdentityRemoved = "NO" if context.identity_kept else "YES"
        methods = [f"webaims-tui rule set {self.rule_set.name}"[:64]]
        if self._codes:
            methods.insert(0, "PS3.15 Basic Application Confidentiality Profile"[:64])
        dataset.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
        codes = Sequence()
        for code in self._codes:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = code.meaning
            codes.append(item)
        if codes:
            dataset.DeidentificationMethodCodeSequence = codes
        longitudinal = self.rule_set.profile.retain_longitudinal
        if self.rule_set.profile.name == "basic":
            dataset.LongitudinalTemporalInformationModified = {
                "off": "REMOVED",
                "full": "UNMODIFIED",
                "modified": "MODIFIED",
            }[longitudinal]
        elif self._uses_shift:
            dataset.LongitudinalTemporalInformationModified = "MODIFIED"
        if context.trace is not None:
            for tag, old in before.items():
                raw = dataset.get_item(tag)
                if raw is None:
                    continue
                context.trace.append(
                    ElementChange(
                        path=keyword_for_tag(tag),
                        tag=_tag_text(tag),
                        keyword=keyword_for_tag(tag),
                        vr=str(dictionary_VR(tag)),
                        action="set",
                        rule="de-identification attributes (PS3.15 E.1.1)",
                        before=old,
                        after=_display(dataset, tag, raw),
                    )
                )

    # --- tracing -----------------------------------------------------------------------------

    def _trace_keep(
        self,
        context: _Context,
        path: str,
        tag: int,
        vr: str,
        raw: DataElement | RawDataElement | Dataset | None,
        label: str,
    ) -> None:
        if context.trace is None:
            return
        shown = _display_raw(raw, tag) if not isinstance(raw, Dataset) else ""
        self._trace(context, path, tag, vr, "keep", label, shown, shown)

    def _trace(
        self,
        context: _Context,
        path: str,
        tag: int,
        vr: str,
        action: str,
        label: str,
        before: str | None,
        after: str | None,
    ) -> None:
        if context.trace is None:
            return
        keyword = keyword_for_tag(tag) or ""
        context.trace.append(
            ElementChange(
                path=f"{path}{keyword or _tag_text(tag)}",
                tag=_tag_text(tag),
                keyword=keyword,
                vr=vr,
                action=action,
                rule=label,
                before=before,
                after=after,
            )
        )


_ADDED_TAGS = tuple(
    keyword_dict[k]
    for k in (
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    )
)


# --- value helpers --------------------------------------------------------------------------


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _text(raw: DataElement | RawDataElement, dataset: Dataset, tag: int) -> str:
    value = dataset[tag].value if isinstance(raw, RawDataElement) else raw.value
    return str(value or "").strip()


def _creator_of(dataset: Dataset, group: int, element_number: int) -> str | None:
    creator_tag = (group << 16) | (element_number >> 8)
    if dataset.get_item(creator_tag, keep_deferred=True) is None:
        return None
    return str(dataset[creator_tag].value or "").strip()


def _map_values(value: object, function: Callable[[str], str]) -> object:
    """Apply ``function`` to each value of a (possibly multi-valued) element value."""
    if value is None or value == "":
        return value
    if isinstance(value, list | MultiValue):
        return [function(str(v)) for v in value]
    return function(str(value))


def _empty_value(vr: str) -> object:
    if vr == "SQ":
        return Sequence()
    return "" if vr in _STRING_VRS else None


def _typed(value: str, vr: str) -> object:
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return int(value) if value else None
    if vr in ("FL", "FD"):
        return float(value) if value else None
    return value


_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})")


def _shift(value: str, vr: str, days: int) -> str:
    """``value`` (DA, or the date of a DT) moved ``days`` back; empty when it is no date."""
    value = value.strip()
    found = _DATE.match(value)
    if not found:
        return ""  # cannot shift: a date left as sent would defeat the shift
    try:
        original = date(int(found[1]), int(found[2]), int(found[3]))
        shifted = original - timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return shifted.strftime("%Y%m%d").zfill(8) + (value[8:] if vr == "DT" else "")


def _year_only(value: str, vr: str) -> str:
    value = value.strip()
    if not re.match(r"^\d{4}", value):
        return ""
    return value[:4] + "0101" if vr == "DA" else value[:4]


def _round_age(value: str, step: int) -> str:
    """An age rounded down to ``step`` years; 90 and over become 090Y (as HIPAA asks)."""
    found = re.fullmatch(r"(\d{3})([DWMY])", value.strip())
    if not found:
        return ""
    number, unit = int(found[1]), found[2]
    if unit != "Y":
        return value.strip()  # days, weeks, months: an infant's age, no bin to round to
    if number >= 90:
        return "090Y"
    return f"{number - number % step:03d}Y"


def _display_raw(raw: DataElement | RawDataElement | None, tag: int) -> str:
    if raw is None:
        return ""
    if isinstance(raw, RawDataElement):
        if raw.value is None:
            return f"<{raw.length} bytes, not read>"
        if raw.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ") or tag in PIXEL_TAGS:
            return f"<{raw.length} bytes>"
        return raw.value.decode("latin-1", "replace").strip(" \x00")[:80]
    return _display_element(raw)


def _display(dataset: Dataset, tag: int, raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, RawDataElement):
        if raw.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or tag in PIXEL_TAGS:
            return _display_raw(raw, tag)
        raw = dataset[tag]
    assert isinstance(raw, DataElement)
    return _display_element(raw)


def _display_element(element: DataElement) -> str:
    if element.VR == "SQ":
        return f"<sequence of {len(element.value or [])} items>"
    if isinstance(element.value, bytes | bytearray):
        return f"<{len(element.value)} bytes>"
    if element.value is None:
        return ""
    return str(element.value)[:80]


# --- building anonymizers from settings and the stored rule sets ----------------------------


def site_keys(settings: Settings) -> Keys:
    """The keyed derivations of this site: its secret (created on first use) and UID root."""
    root = settings.anonymization.uid_root
    problem = valid_uid_root(root)
    if problem:
        raise ConfigError(f"{settings.config_file}: anonymization.{problem}")
    secret_file = locations.site_secret_file(settings.paths.data_dir)
    return Keys(load_or_create_site_secret(secret_file), root)


def active_anonymizer(settings: Settings) -> RuleAnonymizer:
    """The active stored rule set (the built-in default on a new archive), ready to apply.

    Needs the archive database bound (``Engine.open()``). The returned anonymizer records
    pseudonyms in the linkage database and can be pickled into worker processes.
    """
    rule_set, stored = rules.active_rule_set(default_rule_set())
    return RuleAnonymizer(
        rule_set,
        site_keys(settings),
        settings.anonymization,
        version=stored.id,
        linkage=Linkage(settings.paths.linkage_database_url),
    )


def dry_run_file(settings: Settings, path: Path, rule_set: RuleSet) -> DryRunReport:
    """What ``rule_set`` would do to the file at ``path``: nothing is written anywhere.

    Large values (pixel data) are left unread; the linkage database is not touched.
    """
    dataset = dcmread(path, defer_size=4096)
    anonymizer = RuleAnonymizer(rule_set, site_keys(settings), settings.anonymization)
    return anonymizer.dry_run(dataset)


def reidentify(settings: Settings, pseudonym: str) -> list[LinkEntry]:
    """The originals behind ``pseudonym``, from the linkage database (admin use only)."""
    linkage = Linkage(settings.paths.linkage_database_url)
    try:
        return linkage.lookup(pseudonym.strip())
    finally:
        linkage.close()
