"""Settings: defaults, precedence, validation messages, first-run config file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from webaims_tui import locations
from webaims_tui.config import ConfigError, Overrides, ensure_folders, load_settings


def test_defaults_apply_with_no_config_file_and_one_is_written_for_editing() -> None:
    settings = load_settings()
    assert settings.server.ae_title == "WEBAIMS"
    assert settings.server.port == 11112
    assert settings.server.host == "0.0.0.0"
    assert settings.paths.data_dir == locations.default_data_dir()
    assert settings.paths.incoming == settings.paths.data_dir / "incoming"
    assert settings.paths.database_url.startswith("sqlite:///")
    written = locations.default_config_file()
    assert written.exists()
    # Every line is commented: the written file changes nothing, and it is valid TOML.
    assert tomllib.loads(written.read_text()) == {
        "server": {},
        "paths": {},
        "autoloader": {},
        "anonymization": {},
        "display": {},
    }
    assert load_settings().server == settings.server


def test_precedence_is_flag_then_environment_then_file_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nport = 4000\nae_title = "FROMFILE"\n[paths]\ndata_dir = "{tmp_path / "file"}"\n'
    )
    monkeypatch.setenv("WEBAIMS_CONFIG", str(config))
    settings = load_settings()
    assert (settings.server.port, settings.server.ae_title) == (4000, "FROMFILE")
    assert settings.paths.data_dir == tmp_path / "file"
    assert settings.source_of("server.port") == "file"
    assert settings.source_of("server.max_associations") == "default"

    monkeypatch.setenv("WEBAIMS_DATA_DIR", str(tmp_path / "env"))
    settings = load_settings()
    assert settings.paths.data_dir == tmp_path / "env"
    assert settings.source_of("paths.data_dir") == "environment"

    settings = load_settings(Overrides(data_dir=tmp_path / "flag", port=5000, ae_title="FLAG"))
    assert settings.paths.data_dir == tmp_path / "flag"
    assert (settings.server.port, settings.server.ae_title) == (5000, "FLAG")
    assert settings.source_of("server.port") == "flag"

    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 6000\n")
    assert load_settings(Overrides(config_file=other)).server.port == 6000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[server]\nae_title = "SEVENTEEN_CHARS_X"',
            "server.ae_title = 'SEVENTEEN_CHARS_X': longer than 16",
        ),
        ('[server]\nae_title = "A\\\\B"', "must not contain a backslash"),
        ("[server]\nport = 70000", "server.port = 70000: must be between 1 and 65535"),
        ('[server]\nport = "eleven"', "server.port = 'eleven' is not a valid int"),
        ("[server]\ncolour = 1", "unknown key server.colour"),
        ("[nonsense]\na = 1", "unknown section [nonsense]"),
        ('[autoloader]\nrecord_unit = "visit"', "must be one of patient, study, series"),
        ('[autoloader]\nduplicate_policy = "maybe"', "keep-first, overwrite, reject"),
        ('[autoloader]\npath_template = "{PatientID}.dcm"', "must contain {SOPInstanceUID}"),
        (
            "[autoloader]\nmax_decoded_frame_mb = 0",
            "autoloader.max_decoded_frame_mb = 0: must be between 1 and 4096",
        ),
        ("[autoloader]\nmax_decoded_frame_mb = 5000", "must be between 1 and 4096"),
        ('[paths]\ndatabase_url = "mysql://x"', "must start with sqlite:/// or postgresql://"),
        ("[server\nport = 1", "invalid TOML"),
    ],
)
def test_invalid_values_name_the_key_the_value_and_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(Overrides(config_file=config))
    assert message in str(raised.value)
    assert str(config) in str(raised.value)


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(Overrides(config_file=tmp_path / "nope.toml"))


def test_a_folder_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config.write_text(f'[paths]\narchive = "{blocker / "archive"}"\n')
    settings = load_settings(Overrides(config_file=config, data_dir=tmp_path / "data"))
    with pytest.raises(ConfigError) as raised:
        ensure_folders(settings)
    assert "paths.archive" in str(raised.value) and str(config) in str(raised.value)
