"""The add/edit form of one anonymization rule, validated as it is typed.

The match field completes DICOM keywords (and ``(gggg,eeee)`` tags) from pydicom's dictionary and
says which element it resolves to; the engine's own validation (:func:`rules.validate`) runs on
every change, and Save stays disabled while it reports a problem.
"""

from __future__ import annotations

import dataclasses

from pydicom.datadict import dictionary_description, keyword_dict
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Input, Label, Select, Static

from webaims_tui.engine import rules

#: Optional rule fields: (field, label, which action uses it).
ARGUMENT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("value", "Value (set)", "set"),
    ("table", "Lookup table (lookup)", "lookup"),
    ("key", "Pseudonym key keyword", "pseudonym"),
    ("prefix", "Pseudonym prefix", "pseudonym"),
    ("step", "Age bin, years (round-age)", "round-age"),
)


class KeywordSuggester(Suggester):
    """Completes DICOM keywords by prefix (any case) and tags written ``(gggg,eeee)``."""

    def __init__(self) -> None:
        super().__init__(use_cache=True, case_sensitive=True)
        self.keywords = sorted(keyword_dict)
        self.tags = sorted(f"({tag >> 16:04X},{tag & 0xFFFF:04X})" for tag in keyword_dict.values())

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        if value.startswith("("):
            upper = value.upper()
            return next((t for t in self.tags if t.startswith(upper)), None)
        lower = value.lower()
        match = next((k for k in self.keywords if k.lower().startswith(lower)), None)
        # Keep what was typed, complete with the keyword's own spelling.
        return value + match[len(value) :] if match else None


def describe_match(text: str) -> str:
    """What a match string selects: "(0010,0010) Patient's Name, VR PN" or why it is invalid."""
    if not text.strip():
        return "a keyword (PatientName), a tag (0010,0010), a pattern (50xx,xxxx) or a group"
    try:
        selector = rules.parse_selector(text)
    except ValueError as exc:
        return f"✗ {exc}"
    if selector.kind == "tag":
        tag = selector.value
        try:
            name = dictionary_description(tag)
        except KeyError:
            name = "not in the dictionary"
        return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {name}, VR {selector.dictionary_vr or '?'}"
    return f"{selector.kind} selector"


def rule_problems(rule: rules.Rule, rule_set: rules.RuleSet) -> list[str]:
    """The engine's validation of one rule in the context of its rule set (lookup tables)."""
    alone = dataclasses.replace(rule_set, rules=(rule,))
    return [e.reason for e in rules.validate(alone) if e.where.startswith("rule 1 ")]


class RuleFormScreen(ModalScreen[rules.Rule | None]):
    """Add (``rule`` None, its match filled in with ``match``) or edit a rule.

    Dismisses with the rule, or None when cancelled.
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(
        self, rule_set: rules.RuleSet, rule: rules.Rule | None = None, *, match: str = ""
    ) -> None:
        super().__init__(classes="dialog")
        self.rule_set = rule_set
        self.editing = rule is not None
        self.rule = rule or rules.Rule(match=match, action="remove")
        self.problems: list[str] = []

    def compose(self) -> ComposeResult:
        rule = self.rule
        with VerticalScroll(classes="dialog-body rule-form"):
            yield Static("Edit rule" if self.editing else "Add a rule", classes="dialog-question")
            with Horizontal(classes="form-row"):
                yield Label("Match (keyword or tag)", classes="form-label")
                yield Input(rule.match, id="rule-match", suggester=KeywordSuggester())
            yield Label("", id="rule-element", classes="field-hint")
            with Horizontal(classes="form-row"):
                yield Label("Action", classes="form-label")
                yield Select[str](
                    [(action, action) for action in rules.ACTIONS],
                    value=rule.action if rule.action in rules.ACTIONS else "remove",
                    allow_blank=False,
                    id="rule-action",
                )
            for name, label, _action in ARGUMENT_FIELDS:
                value = getattr(rule, name)
                with Horizontal(classes="form-row", id=f"row-{name}"):
                    yield Label(label, classes="form-label")
                    yield Input(
                        "" if value is None else str(value),
                        id=f"rule-{name}",
                        suggester=KeywordSuggester() if name == "key" else None,
                    )
            with Horizontal(classes="form-row"):
                yield Label("Comment", classes="form-label")
                yield Input(rule.comment, id="rule-comment")
            yield Label("", id="rule-problems", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        if self.app.is_headless:
            for field in self.query(Input):
                field.cursor_blink = False
        self.query_one("#rule-match", Input).focus()
        self.revalidate()

    def current(self) -> rules.Rule:
        """The rule as the form stands; arguments the action does not use are left out."""
        action = str(self.query_one("#rule-action", Select).value)
        values: dict[str, object] = {}
        for name, _label, used_by in ARGUMENT_FIELDS:
            text = self.query_one(f"#rule-{name}", Input).value
            if used_by != action or (not text and name != "value"):
                continue
            if name == "step":
                values[name] = int(text) if text.strip().lstrip("-").isdigit() else -1
            else:
                values[name] = text.strip() if name != "value" else text
        return rules.Rule(
            match=self.query_one("#rule-match", Input).value.strip(),
            action=action,
            comment=self.query_one("#rule-comment", Input).value.strip(),
            **values,  # type: ignore[arg-type]
        )

    @on(Input.Changed)
    @on(Select.Changed)
    def revalidate(self) -> None:
        action = str(self.query_one("#rule-action", Select).value)
        for name, _label, used_by in ARGUMENT_FIELDS:
            self.query_one(f"#row-{name}").display = used_by == action
        self.query_one("#rule-element", Label).update(
            describe_match(self.query_one("#rule-match", Input).value)
        )
        rule = self.current()
        self.problems = rule_problems(rule, self.rule_set) if rule.match else ["match: required"]
        text = "\n".join(f"✗ {p}" for p in self.problems)
        self.query_one("#rule-problems", Label).update(text)
        self.query_one("#save", Button).disabled = bool(self.problems)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        self.revalidate()
        if self.problems:
            self.app.bell()
            return
        self.dismiss(self.current())

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
