"""The hardening settings: validated with a message naming the key, defaults that are safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from webaims_tui.config import ConfigError, Overrides, ServerSettings, load_settings


def _load(tmp_path: Path, server_toml: str) -> ServerSettings:
    config = tmp_path / "config.toml"
    config.write_text("[server]\n" + server_toml)
    return load_settings(Overrides(config_file=config, data_dir=tmp_path / "data")).server


def test_defaults_are_generous_and_plain_tcp(tmp_path: Path) -> None:
    server = _load(tmp_path, "")
    assert server.max_instance_mb == 4096
    assert not server.tls_enabled


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ("max_instance_mb = 0", "max_instance_mb", "between 1 and"),
        ('tls_certificate = "CERT"', "tls_certificate", "needs tls_private_key"),
        ('tls_private_key = "KEY"', "tls_private_key", "needs tls_certificate"),
        (
            'tls_certificate = "CERT"\ntls_private_key = "KEY"\n'
            "tls_require_client_certificate = true",
            "tls_require_client_certificate",
            "needs tls_ca_certificates",
        ),
        ('tls_ca_certificates = "CA"', "tls_ca_certificates", "needs tls_certificate"),
        (
            'tls_certificate = "/no/such.crt"\ntls_private_key = "KEY"',
            "tls_certificate",
            "not found",
        ),
    ],
)
def test_invalid_hardening_settings_name_the_key(
    tmp_path: Path, toml: str, key: str, reason: str
) -> None:
    for name in ("CERT", "KEY", "CA"):
        (tmp_path / name).write_text("x")
        toml = toml.replace(f'"{name}"', f'"{tmp_path / name}"')
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, toml)
    assert f"server.{key}" in str(error.value)
    assert reason in str(error.value)
    assert str(tmp_path / "config.toml") in str(error.value)
