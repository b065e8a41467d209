"""Remote nodes: validation naming the field, CRUD through the Engine and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SettingsFactory
from webaims_tui.__main__ import main
from webaims_tui.engine import db
from webaims_tui.engine.nodes import NodeError, peer_for, validate_node
from webaims_tui.engine.qr import EchoResult
from webaims_tui.engine.service import Engine


@pytest.fixture
def opened(make_settings: SettingsFactory) -> Iterator[Engine]:
    engine = Engine(make_settings())
    engine.open()
    yield engine
    engine.stop()


def test_add_list_edit_remove(opened: Engine) -> None:
    node = opened.add_node("pacs", ae_title="PACS1", host="10.0.0.5", port=104)
    assert (node.query_model, node.retrieve_method, node.max_pdu_size) == ("study", "c-move", 65536)
    opened.add_node("backup", ae_title="BACKUP", host="pacs2.local", port="11112")
    assert [n.name for n in opened.nodes()] == ["backup", "pacs"]

    opened.edit_node("pacs", retrieve_method="c-get", dimse_timeout="90", name="main-pacs")
    peer = peer_for(opened.node("main-pacs"))
    assert (peer.name, peer.ae_title, peer.retrieve_method, peer.dimse_timeout) == (
        "main-pacs",
        "PACS1",
        "c-get",
        90.0,
    )
    with pytest.raises(NodeError, match="no remote node named 'pacs'; known nodes: backup"):
        opened.node("pacs")

    opened.remove_node("backup")
    assert [n.name for n in opened.nodes()] == ["main-pacs"]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"name": "has space"}, "name = 'has space'"),
        ({"ae_title": "A" * 17}, "ae_title = 'AAAAAAAAAAAAAAAAA': longer than 16"),
        ({"ae_title": "BAD\\AE"}, "backslash"),
        ({"host": "pacs host"}, "host = 'pacs host'"),
        ({"port": 0}, "port = 0: must be between 1 and 65535"),
        ({"port": "http"}, "port = 'http': not a valid int"),
        ({"query_model": "series"}, "query_model = 'series': must be patient or study"),
        ({"retrieve_method": "wado"}, "retrieve_method = 'wado'"),
        ({"acse_timeout": 0}, "acse_timeout = 0.0: must be a positive"),
        ({"max_pdu_size": 100}, "max_pdu_size = 100"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "tls_ca_file = '/nonexistent/ca.pem': file not"),
        ({"colour": "red"}, "unknown node field"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], named: str) -> None:
    with pytest.raises(NodeError) as caught:
        validate_node(values)
    assert named in str(caught.value)


def test_add_refuses_duplicates_and_missing_fields_and_stores_nothing(opened: Engine) -> None:
    opened.add_node("pacs", ae_title="PACS1", host="10.0.0.5", port=104)
    with pytest.raises(NodeError, match="exists"):
        opened.add_node("pacs", ae_title="OTHER", host="10.0.0.6", port=104)
    with pytest.raises(NodeError, match="host: required"):
        opened.add_node("other", ae_title="OTHER", port=104)
    with pytest.raises(NodeError, match="port = 70000"):
        opened.add_node("other", ae_title="OTHER", host="h", port=70000)
    with pytest.raises(NodeError, match="another node has this name"):
        opened.add_node("second", ae_title="SECOND", host="h", port=104)
        opened.edit_node("second", name="pacs")
    assert [n.name for n in opened.nodes()] == ["pacs", "second"]
    assert opened.node("pacs").ae_title == "PACS1"


def test_echo_outcome_is_remembered(opened: Engine) -> None:
    from webaims_tui.engine.nodes import record_echo

    opened.add_node("pacs", ae_title="PACS1", host="127.0.0.1", port=104)
    record_echo("pacs", EchoResult(ok=False, peer="pacs", elapsed=0.1, message="refused"))
    node = opened.node("pacs")
    assert node.last_echo_ok is False and node.last_echo_detail == "refused"
    assert node.last_echo_at is not None


def _cli(tmp_path: Path, *argv: str) -> list[str]:
    return ["--data-dir", str(tmp_path / "cli-data"), *argv]


def test_cli_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_cli(tmp_path, "nodes", "list")) == 0
    assert "no remote nodes yet" in capsys.readouterr().out
    assert main(_cli(tmp_path, "nodes", "add", "pacs", "10.1.2.3:4242", "--called-ae", "PACS")) == 0
    assert "added pacs: PACS@10.1.2.3:4242" in capsys.readouterr().out
    assert main(_cli(tmp_path, "nodes", "edit", "pacs", "--retrieve-method", "c-get")) == 0
    capsys.readouterr()
    assert main(_cli(tmp_path, "nodes", "list", "--json")) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [
        (n["name"], n["ae_title"], n["host"], n["port"], n["retrieve_method"]) for n in listed
    ] == [("pacs", "PACS", "10.1.2.3", 4242, "c-get")]
    assert main(_cli(tmp_path, "nodes", "list")) == 0
    table = capsys.readouterr().out
    assert "PACS" in table and "10.1.2.3:4242" in table and "never" in table

    # Bad input: one line naming the field, exit code 2, nothing changed.
    assert main(_cli(tmp_path, "nodes", "edit", "pacs", "--called-ae", "X" * 20)) == 2
    assert "ae_title = 'XXXXXXXXXXXXXXXXXXXX': longer than 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(_cli(tmp_path, "nodes", "add", "other", "nohostport", "--called-ae", "O"))
    assert usage.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert main(_cli(tmp_path, "nodes", "remove", "nope")) == 2
    assert "no remote node named 'nope'" in capsys.readouterr().err

    assert main(_cli(tmp_path, "nodes", "remove", "pacs")) == 0
    with db.database.connection_context():
        assert db.RemoteNode.select().count() == 0
