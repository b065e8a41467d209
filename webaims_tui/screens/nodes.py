"""Mode ``nodes``: the remote DICOM nodes (PACS) we query and retrieve from.

Add, edit, remove and echo; the last echo of each node is stored by the engine and shown here
and on the Query/Retrieve screen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Static

from webaims_tui.engine import nodes as remote_nodes
from webaims_tui.screens.base import WebaimsScreen
from webaims_tui.screens.dialogs import ConfirmScreen
from webaims_tui.screens.node_form import NodeFormScreen
from webaims_tui.widgets.status_header import StatusHeader

if TYPE_CHECKING:
    from webaims_tui.engine import db, qr


def last_echo(node: db.RemoteNode) -> Text:
    if node.last_echo_at is None:
        return Text("never", style="dim")
    when = f"{node.last_echo_at:%Y-%m-%d %H:%M}"
    if node.last_echo_ok:
        return Text(f"ok {when}", style="green")
    return Text(f"FAILED {when}", style="bold red")


class NodesScreen(WebaimsScreen):
    """Mode ``nodes``: a table of nodes; a form to add or edit one."""

    TITLE = "Remote nodes"
    HELP = """\
[b]Remote nodes[/b]
The PACS this archive queries and retrieves from. a adds a node, enter or e edits the one under
the cursor, d removes it (after a confirmation), c sends a C-ECHO and stores the result.
For C-MOVE the PACS must know our AE title, host and port (see the Settings screen): an echo
succeeding does not prove that; a retrieve says so when it is the problem."""

    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("e", "edit", "Edit"),
        Binding("d", "remove", "Remove"),
        Binding("c", "echo", "Echo"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[db.RemoteNode] = []

    def compose(self) -> ComposeResult:
        yield StatusHeader()
        table: DataTable[str | Text] = DataTable(id="nodes-table", cursor_type="row")
        yield table
        yield Static("", id="node-detail")
        yield Static("", id="nodes-message")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#nodes-table", DataTable)
        for column in ("Name", "AE title", "Host:port", "Model", "Retrieve", "TLS", "Last echo"):
            table.add_column(column, key=column)
        table.focus()
        if self.webaims.engine_ready:
            self.engine_ready()

    def engine_ready(self) -> None:
        self.load()

    @work(thread=True, group="nodes", exclusive=True, exit_on_error=False, name="load nodes")
    def load(self, select: str | None = None) -> None:
        nodes = self.webaims.engine.nodes()
        self.app.call_from_thread(self.show, nodes, select)

    def show(self, nodes: list[db.RemoteNode], select: str | None = None) -> None:
        self.nodes = nodes
        table = self.query_one("#nodes-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for node in nodes:
            table.add_row(
                node.name,
                node.ae_title,
                f"{node.host}:{node.port}",
                "Patient" if node.query_model == "patient" else "Study",
                node.retrieve_method.upper(),
                "yes" if node.tls else "",
                last_echo(node),
                key=node.name,
            )
        if select is not None and select in [n.name for n in nodes]:
            table.move_cursor(row=[n.name for n in nodes].index(select))
        elif nodes:
            table.move_cursor(row=min(cursor, len(nodes) - 1))
        if not nodes:
            self.say("No remote nodes yet: press a to add one.")
        self.show_detail()

    @property
    def current(self) -> db.RemoteNode | None:
        table = self.query_one("#nodes-table", DataTable)
        if not self.nodes or not 0 <= table.cursor_row < len(self.nodes):
            return None
        return self.nodes[table.cursor_row]

    @on(DataTable.RowHighlighted)
    def show_detail(self) -> None:
        node = self.current
        detail = self.query_one("#node-detail", Static)
        if node is None:
            detail.update("")
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{node.name}: ", style="bold")
        text.append(
            f"timeouts {node.acse_timeout:g}/{node.dimse_timeout:g}/{node.network_timeout:g} s, "
            f"max PDU {node.max_pdu_size}"
        )
        if node.last_echo_detail:
            text.append(f"\nlast echo: {node.last_echo_detail}")
        detail.update(text)

    def say(self, text: str, *, error: bool = False) -> None:
        message = self.query_one("#nodes-message", Static)
        message.update(text)
        message.set_class(error, "-error")

    # --- actions ------------------------------------------------------------------------------

    def action_add(self) -> None:
        self.app.push_screen(NodeFormScreen(), self._stored)

    @on(DataTable.RowSelected)
    def action_edit(self) -> None:
        node = self.current
        if node is not None:
            self.app.push_screen(NodeFormScreen(node), self._stored)

    def _stored(self, name: str | None) -> None:
        if name:
            self.say(f"Node {name} saved. Press c to echo it.")
            self.load(select=name)

    def action_remove(self) -> None:
        node = self.current
        if node is None:
            return
        name = node.name
        question = f"Remove the node {name} ({node.ae_title}@{node.host}:{node.port})?"

        def answered(confirmed: bool | None) -> None:
            if confirmed:
                self.remove_node(name)

        self.app.push_screen(ConfirmScreen(question, yes="Remove", danger=True), answered)

    @work(thread=True, group="nodes", exit_on_error=False, name="remove node")
    def remove_node(self, name: str) -> None:
        try:
            self.webaims.engine.remove_node(name)
        except remote_nodes.NodeError as exc:
            self.app.call_from_thread(self.say, str(exc), error=True)
            return
        self.app.call_from_thread(self.say, f"Node {name} removed.")
        self.app.call_from_thread(self.load)

    def action_echo(self) -> None:
        node = self.current
        if node is None:
            return
        self.say(f"Echoing {node.name}…")
        self.echo(node.name)

    @work(thread=True, group="nodes-echo", exit_on_error=False, name="echo")
    def echo(self, name: str) -> None:
        result: qr.EchoResult = self.webaims.engine.echo(name)
        if result.ok:
            message = f"Echo {name}: ok in {result.elapsed * 1000:.0f} ms"
        else:
            message = f"Echo {name} failed ({result.problem}): {result.message}"
        self.app.call_from_thread(self.say, message, error=not result.ok)
        self.app.call_from_thread(self.load, name)
