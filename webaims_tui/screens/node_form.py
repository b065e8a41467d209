"""The add/edit form of a remote node: every field validated as it is typed, by the engine's rules.

The form checks each field with :func:`engine.nodes.validate_node` (the CLI's rules too), shows the
message under the field that is wrong, and stores through the engine in a thread; a failure to
store (a duplicate name) is shown in the form and nothing is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from webaims_tui.engine import nodes as remote_nodes

if TYPE_CHECKING:
    from webaims_tui.app import WebaimsApp
    from webaims_tui.engine import db

#: (field, label) of the text fields, in form order.
TEXT_FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "Name"),
    ("ae_title", "AE title"),
    ("host", "Host"),
    ("port", "Port"),
    ("acse_timeout", "Association timeout (s)"),
    ("dimse_timeout", "Response timeout (s)"),
    ("network_timeout", "Network timeout (s)"),
    ("max_pdu_size", "Max PDU (0 = unlimited)"),
    ("tls_ca_file", "TLS CA file"),
    ("tls_cert_file", "TLS certificate file"),
    ("tls_key_file", "TLS key file"),
)


class NodeFormScreen(ModalScreen[str | None]):
    """Add (``node`` None) or edit a node; dismisses with the stored node's name, or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, node: db.RemoteNode | None = None) -> None:
        super().__init__(classes="dialog")
        self.node = node
        self.values: dict[str, Any] = (
            remote_nodes.node_as_dict(node)
            if node is not None
            else {"name": "", **remote_nodes.NODE_DEFAULTS}
        )
        self.errors: dict[str, str] = {}

    @property
    def webaims(self) -> WebaimsApp:
        from webaims_tui.app import WebaimsApp

        assert isinstance(self.app, WebaimsApp)
        return self.app

    def compose(self) -> ComposeResult:
        title = f"Edit node {self.node.name}" if self.node is not None else "Add a remote node"
        with VerticalScroll(classes="dialog-body node-form"):
            yield Static(title, classes="dialog-question")
            for key, label in TEXT_FIELDS[:4]:
                yield from self._field(key, label)
            with Horizontal(classes="form-row"):
                yield Label("Query model", classes="form-label")
                yield Select[str](
                    [("Study Root", "study"), ("Patient Root", "patient")],
                    value=str(self.values["query_model"]),
                    allow_blank=False,
                    id="field-query_model",
                )
            with Horizontal(classes="form-row"):
                yield Label("Retrieve by", classes="form-label")
                yield Select[str](
                    [("C-MOVE (PACS sends to our port)", "c-move"), ("C-GET", "c-get")],
                    value=str(self.values["retrieve_method"]),
                    allow_blank=False,
                    id="field-retrieve_method",
                )
            for key, label in TEXT_FIELDS[4:8]:
                yield from self._field(key, label)
            yield Checkbox("TLS", bool(self.values["tls"]), id="field-tls")
            for key, label in TEXT_FIELDS[8:]:
                yield from self._field(key, label)
            yield Label("", id="form-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def _field(self, key: str, label: str) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label(label, classes="form-label")
            yield Input(str(self.values.get(key, "")), id=f"field-{key}")
        yield Label("", id=f"error-{key}", classes="field-error")

    def on_mount(self) -> None:
        for field_input in self.query(Input):
            if self.app.is_headless:
                field_input.cursor_blink = False
        for label in self.query(".field-error"):
            label.display = False
        self.query_one("#field-name", Input).focus()

    # --- validation as you type ---------------------------------------------------------------

    @on(Input.Changed)
    def validate_field(self, event: Input.Changed) -> None:
        key = (event.input.id or "").removeprefix("field-")
        self.check_field(key, event.value)

    def check_field(self, key: str, value: str) -> None:
        try:
            remote_nodes.validate_node({key: value})
        except remote_nodes.NodeError as exc:
            self.errors[key] = str(exc)
        else:
            self.errors.pop(key, None)
        if key in ("name", "ae_title", "host", "port") and not value.strip():
            self.errors[key] = f"{key}: required"
        error = self.query_one(f"#error-{key}", Label)
        error.update(self.errors.get(key, ""))
        error.display = key in self.errors
        self.query_one("#save", Button).disabled = bool(self.errors)

    def collect(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            key: self.query_one(f"#field-{key}", Input).value.strip() for key, _ in TEXT_FIELDS
        }
        values["query_model"] = self.query_one("#field-query_model", Select).value
        values["retrieve_method"] = self.query_one("#field-retrieve_method", Select).value
        values["tls"] = self.query_one("#field-tls", Checkbox).value
        return values

    # --- save ---------------------------------------------------------------------------------

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        values = self.collect()
        for key, _ in TEXT_FIELDS:
            self.check_field(key, str(values[key]))
        if self.errors:
            first = next(iter(self.errors.values()))
            self.query_one("#form-error", Label).update(f"Not saved: {first}")
            return
        self.query_one("#form-error", Label).update("Saving…")
        self.store(values)

    @work(thread=True, group="node-save", exclusive=True, exit_on_error=False, name="save node")
    def store(self, values: dict[str, Any]) -> None:
        engine = self.webaims.engine
        name = str(values.pop("name"))
        try:
            if self.node is None:
                engine.add_node(name, **values)
            else:
                engine.edit_node(self.node.name, name=name, **values)
        except remote_nodes.NodeError as exc:
            self.app.call_from_thread(self._store_failed, str(exc))
            return
        self.app.call_from_thread(self.dismiss, name)

    def _store_failed(self, message: str) -> None:
        self.query_one("#form-error", Label).update(f"Not saved: {message}")

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
