"""Modal dialogs shared by the screens: confirm, export destination, help."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """Asks a yes/no question; dismisses True only for an explicit yes."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, *, yes: str = "Yes", danger: bool = False) -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.yes_label = yes
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-body"):
            yield Static(self.question, classes="dialog-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button(
                    f"{self.yes_label} (y)",
                    id="yes",
                    variant="error" if self.danger else "primary",
                )
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        # Focus starts on Cancel: a stray Enter must not delete anything.
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def answer_from_button(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


@dataclass(frozen=True)
class ExportChoice:
    destination: Path
    as_zip: bool


class ExportScreen(ModalScreen[ExportChoice | None]):
    """Asks where to export a unit, and whether as a zip file."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, what: str, default: Path) -> None:
        super().__init__(classes="dialog")
        self.what = what
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-body"):
            yield Static(f"Export {self.what} to:", classes="dialog-question")
            yield Input(str(self.default), id="destination")
            yield Checkbox("as one zip file", id="zip")
            yield Label("", id="export-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Export", id="export", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        if self.app.is_headless:
            self.query_one(Input).cursor_blink = False
        self.query_one(Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#export")
    def export(self) -> None:
        text = self.query_one("#destination", Input).value.strip()
        if not text:
            self.query_one("#export-error", Label).update("Give a folder or file name.")
            return
        destination = Path(text).expanduser()
        self.dismiss(ExportChoice(destination, self.query_one("#zip", Checkbox).value))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def unwrapped(text: str) -> str:
    """Help text with its source line breaks taken out of sentences, so the box wraps it.

    The HELP strings are wrapped for the source file (~95 columns), wider than the box at
    80x24; a line that does not end a sentence, a heading or a list lead-in (``.``, ``]``,
    ``:``) goes on with the next.
    """
    lines: list[str] = []
    for line in text.splitlines():
        if lines and line and lines[-1] and not lines[-1].rstrip().endswith((".", ":", "]")):
            lines[-1] = f"{lines[-1].rstrip()} {line.lstrip()}"
        else:
            lines.append(line)
    return "\n".join(lines)


class HelpScreen(ModalScreen[None]):
    """Help for the screen underneath: its description and every key it answers to."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, screen: Screen[object], help_text: str) -> None:
        super().__init__(classes="dialog")
        self.for_screen = screen
        self.help_text = help_text

    def compose(self) -> ComposeResult:
        keys = Text()
        seen: set[str] = set()

        # Focus next/previous and copy, which every Textual screen has: not the screen's own.
        navigation = {binding.action for binding in Screen.BINDINGS if isinstance(binding, Binding)}

        def rank(node: object, binding: Binding) -> int:
            # The screen's own keys first, then the app's, then navigation and widgets' keys.
            if node is self.for_screen and binding.action not in navigation:
                return 0
            return 1 if node is self.app else 2

        active = sorted(
            self.for_screen.active_bindings.values(), key=lambda a: rank(a.node, a.binding)
        )
        for _node, binding, _enabled, _tooltip in active:
            if not binding.description or binding.description in seen:
                continue
            seen.add(binding.description)
            key = self.app.get_key_display(binding)
            keys.append(f"{key:>12}  ", style="bold")
            keys.append(f"{binding.description}\n")
        with VerticalScroll(classes="dialog-body help-body"):
            yield Static(unwrapped(self.help_text), classes="help-text")
            yield Static(keys, classes="help-keys")
            yield Static("esc closes this help", classes="help-hint")

    def action_close(self) -> None:
        self.dismiss(None)
