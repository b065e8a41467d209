"""The Query/Retrieve client over DICOM TLS, against our own TLS SCP (certificates by openssl)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SettingsFactory
from tests.helpers import EventRecorder
from webaims_tui.engine.qr import LocalAE, Peer, QRClient
from webaims_tui.engine.service import Engine

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed"),
]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _authority(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
        "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def _issue(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", folder / f"{name}.ext",
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qr-pki")
    ca = _authority(folder, "ca")
    rogue = _authority(folder, "rogue")
    server = _issue(
        folder, "server", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client = _issue(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    return {
        "ca": ca[1],
        "rogue": rogue[1],
        "server_cert": server[1],
        "server_key": server[0],
        "client_cert": client[1],
        "client_key": client[0],
    }


@pytest.fixture
def tls_scp(
    make_settings: SettingsFactory, events: EventRecorder, pki: dict[str, Path]
) -> Iterator[int]:
    engine = Engine(
        make_settings(
            tls_certificate=str(pki["server_cert"]),
            tls_private_key=str(pki["server_key"]),
            tls_ca_certificates=str(pki["ca"]),
            tls_require_client_certificate=True,
            acse_timeout=3.0,
            network_timeout=3.0,
        ),
        sink=events,
    )
    engine.start()
    assert engine.server is not None and engine.server.listening
    yield engine.server.port
    engine.stop()


def _client(tmp_path: Path) -> QRClient:
    return QRClient(LocalAE("QRCLIENT", 0), incoming=tmp_path, spool=tmp_path)


def test_echo_over_tls_with_a_client_certificate(
    tmp_path: Path, tls_scp: int, pki: dict[str, Path]
) -> None:
    peer = Peer(
        name="secure", ae_title="WEBAIMS", host="127.0.0.1", port=tls_scp, tls=True,
        tls_ca_file=str(pki["ca"]), tls_cert_file=str(pki["client_cert"]),
        tls_key_file=str(pki["client_key"]), acse_timeout=5,
    )  # fmt: skip
    result = _client(tmp_path).echo(peer)
    assert result.ok, result.message


def test_untrusted_server_certificate_is_explained(
    tmp_path: Path, tls_scp: int, pki: dict[str, Path]
) -> None:
    peer = Peer(
        name="secure", ae_title="WEBAIMS", host="127.0.0.1", port=tls_scp, tls=True,
        tls_ca_file=str(pki["rogue"]), tls_cert_file=str(pki["client_cert"]),
        tls_key_file=str(pki["client_key"]), acse_timeout=5,
    )  # fmt: skip
    result = _client(tmp_path).echo(peer)
    assert not result.ok and result.problem == "tls"
    assert "is not trusted" in result.message and "tls_ca_file" in result.message


def test_missing_client_key_is_a_setup_error(tmp_path: Path, pki: dict[str, Path]) -> None:
    peer = Peer(
        ae_title="X", host="127.0.0.1", port=1, tls=True, tls_cert_file=str(pki["client_cert"])
    )
    result = _client(tmp_path).echo(peer)
    assert result.problem == "tls" and "needs both the certificate and its key" in result.message
