"""Settings: frozen dataclasses, loaded from TOML and validated.

Precedence for every value: command-line flag > environment variable > config file > built-in
default. :attr:`Settings.sources` records which of those each value came from, so the settings
screen and ``--help`` can say so. An invalid value is a :class:`ConfigError` naming the key, the
value and the file; the program does not start with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from webaims_tui import locations
from webaims_tui.engine.archive import PathTemplateError, template_keywords

RecordUnit = Literal["patient", "study", "series"]
DuplicatePolicy = Literal["keep-first", "overwrite", "reject"]

RECORD_UNITS: tuple[str, ...] = get_args(RecordUnit)
DUPLICATE_POLICIES: tuple[str, ...] = get_args(DuplicatePolicy)


class ConfigError(Exception):
    """A setting is invalid; the message names the key, the value and where it came from."""


@dataclass(frozen=True)
class ServerSettings:
    """The Storage/Verification SCP."""

    ae_title: str = "WEBAIMS"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 8
    max_pdu_size: int = 65536
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    allowed_calling_aes: tuple[str, ...] = ()
    require_called_ae: bool = False
    min_free_disk_mb: int = 500
    # Success is answered once the file and its folder entry are on disk (fsync), so a power
    # cut cannot lose an acknowledged instance; off trades that for ~1 ms per 512 KB instance.
    fsync: bool = True
    # A received instance larger than this is refused (0xA700) without being held in memory whole.
    max_instance_mb: int = 4096
    # DICOM TLS (PS3.15 Annex B): the SCP speaks TLS 1.2+ only when a certificate is given.
    tls_certificate: str = ""
    tls_private_key: str = ""
    # PEM file of CAs trusted for client certificates.
    tls_ca_certificates: str = ""
    tls_require_client_certificate: bool = False

    @property
    def tls_enabled(self) -> bool:
        """True when the SCP listens with TLS (a certificate is configured)."""
        return bool(self.tls_certificate)


@dataclass(frozen=True)
class PathSettings:
    """Folders and databases. Each folder defaults to a child of ``data_dir``."""

    data_dir: Path
    incoming: Path
    archive: Path
    quarantine: Path
    originals: Path
    spool: Path
    logs: Path
    database_url: str
    linkage_database_url: str


@dataclass(frozen=True)
class AutoloaderSettings:
    """incoming/ -> anonymize -> index -> archive/."""

    record_unit: RecordUnit = "study"
    path_template: str = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    duplicate_policy: DuplicatePolicy = "keep-first"
    sweep_interval: float = 5.0
    keep_originals: bool = False
    batch_size: int = 100
    # Archive files and their folder entries reach the disk (fsync) before the index commit
    # and before the incoming original is deleted: a power cut cannot lose an instance.
    fsync: bool = True
    # A compressed frame whose header says it decodes to more is quarantined, and no frame
    # over it is previewed: pydicom allocates what the header says, so a small file can claim
    # gigabytes. Generous: a mammography or tomosynthesis frame is ~30 MB, whole-slide tiles
    # far less.
    max_decoded_frame_mb: int = 1024

    @property
    def max_decoded_frame_bytes(self) -> int:
        """``max_decoded_frame_mb`` in bytes."""
        return self.max_decoded_frame_mb * 1024 * 1024


@dataclass(frozen=True)
class AnonymizationSettings:
    """Keys and safety nets of the anonymizer."""

    uid_root: str = "2.25."
    quarantine_burned_in: bool = True
    burned_in_modalities: tuple[str, ...] = ("US", "SC")
    #: Secondary Capture and its multi-frame variants (scanned documents, screenshots), and
    #: Encapsulated PDF and CDA: their text sits inside one opaque value that neither the rules
    #: nor the residual-PHI check can read.
    burned_in_sop_classes: tuple[str, ...] = (
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        "1.2.840.10008.5.1.4.1.1.104.1",
        "1.2.840.10008.5.1.4.1.1.104.2",
    )


@dataclass(frozen=True)
class DisplaySettings:
    """What the terminal shows."""

    # Over-the-shoulder privacy: names and IDs stay off the live log unless asked for.
    show_patient_data: bool = False
    free_disk_warning_mb: int = 2048


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    paths: PathSettings
    autoloader: AutoloaderSettings
    anonymization: AnonymizationSettings
    display: DisplaySettings
    config_file: Path
    sources: Mapping[str, str] = field(default_factory=dict)

    def source_of(self, key: str) -> str:
        """Where ``section.key`` came from: default, file, environment or flag."""
        return self.sources.get(key, "default")


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line (``None`` when the flag was not used)."""

    config_file: Path | None = None
    data_dir: Path | None = None
    ae_title: str | None = None
    port: int | None = None
    host: str | None = None
    database_url: str | None = None


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "paths": PathSettings,
    "autoloader": AutoloaderSettings,
    "anonymization": AnonymizationSettings,
    "display": DisplaySettings,
}

_PATH_KEYS = ("data_dir", "incoming", "archive", "quarantine", "originals", "spool", "logs")


def load_settings(overrides: Overrides | None = None) -> Settings:
    """Build the effective settings from flags, environment, config file and defaults."""
    overrides = overrides or Overrides()
    sources: dict[str, str] = {}

    config_file, config_source = _choose_config_file(overrides)
    raw = _read_config_file(config_file, must_exist=config_source != "default")
    _reject_unknown_keys(raw, config_file)

    def from_file(section: str) -> dict[str, Any]:
        values = dict(raw.get(section, {}))
        for key in values:
            sources[f"{section}.{key}"] = "file"
        return values

    server_values = from_file("server")
    for key, value in (
        ("ae_title", overrides.ae_title),
        ("port", overrides.port),
        ("host", overrides.host),
    ):
        if value is not None:
            server_values[key] = value
            sources[f"server.{key}"] = "flag"
    server = _build(ServerSettings, server_values, "server", config_file, sources)
    _validate_server(server, config_file, sources)

    paths = _build_paths(from_file("paths"), overrides, config_file, sources)
    autoloader = _build(
        AutoloaderSettings, from_file("autoloader"), "autoloader", config_file, sources
    )
    _validate_autoloader(autoloader, config_file, sources)
    anonymization = _build(
        AnonymizationSettings, from_file("anonymization"), "anonymization", config_file, sources
    )
    display = _build(DisplaySettings, from_file("display"), "display", config_file, sources)
    return Settings(
        server=server,
        paths=paths,
        autoloader=autoloader,
        anonymization=anonymization,
        display=display,
        config_file=config_file,
        sources=sources,
    )


def ensure_folders(settings: Settings) -> None:
    """Create the data folders; a folder that cannot be created or written is a ConfigError."""
    for key in _PATH_KEYS:
        folder: Path = getattr(settings.paths, key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = f"cannot create it ({exc.strerror})"
            raise _error(settings, f"paths.{key}", folder, reason) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise _error(settings, f"paths.{key}", folder, "folder is not writable")


def check_path_template(settings: Settings) -> None:
    """A path template naming anything but DICOM keywords is a ConfigError naming the key.

    Checked before the engine starts (``__main__``): the autoloader would refuse it only once
    running, where the TUI can show it as a notification at most.
    """
    template = settings.autoloader.path_template
    try:
        template_keywords(template)
    except PathTemplateError as exc:
        raise _error(settings, "autoloader.path_template", template, str(exc)) from None


def write_default_config(path: Path) -> None:
    """Write a config file whose every line is a commented default, for the user to edit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(default_config_text(), encoding="utf-8")


def default_config_text() -> str:
    lines = [
        "# webaims-tui configuration. Every value shown is the built-in default;",
        "# uncomment a line to change it. Precedence: flag > environment > this file > default.",
    ]
    for section, cls in _SECTIONS.items():
        lines += ["", f"[{section}]"]
        if cls is PathSettings:
            lines += [
                f'# data_dir = "{locations.default_data_dir()}"',
                "# incoming, archive, quarantine, originals, spool, logs default to data_dir/NAME",
                '# database_url = "sqlite:///<data_dir>/webaims.sqlite3"',
                '# linkage_database_url = "sqlite:///<data_dir>/linkage.sqlite3"',
            ]
            continue
        for f in dataclasses.fields(cls):
            lines.append(f"# {f.name} = {_toml_literal(f.default)}")
    return "\n".join(lines) + "\n"


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return str(value)


def _choose_config_file(overrides: Overrides) -> tuple[Path, str]:
    if overrides.config_file is not None:
        return overrides.config_file.expanduser(), "flag"
    from_env = locations.config_file_from_environment()
    if from_env is not None:
        return from_env, "environment"
    return locations.default_config_file(), "default"


def _read_config_file(path: Path, *, must_exist: bool) -> dict[str, Any]:
    if not path.exists():
        if must_exist:
            raise ConfigError(f"{path}: config file not found")
        # A read-only home must not stop the program: the defaults apply without a file.
        with contextlib.suppress(OSError):
            write_default_config(path)
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def _reject_unknown_keys(raw: Mapping[str, Any], path: Path) -> None:
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for key in values:
            if key not in known:
                raise ConfigError(f"{path}: unknown key {section}.{key}")


def _build(
    cls: type, values: dict[str, Any], section: str, path: Path, sources: Mapping[str, str]
) -> Any:
    converted: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        expected = type(hints[key].default)
        where = _where(path, sources, f"{section}.{key}")
        converted[key] = _coerce(value, expected, f"{section}.{key}", where)
    return cls(**converted)


def _coerce(value: Any, expected: type, key: str, where: str) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif expected is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} = {value!r} is not a valid {expected.__name__}")


def _where(path: Path, sources: Mapping[str, str], key: str) -> str:
    source = sources.get(key, "default")
    if source == "file":
        return str(path)
    if source == "flag":
        return "command line"
    return source


def _error(settings: Settings, key: str, value: object, reason: str) -> ConfigError:
    where = _where(settings.config_file, settings.sources, key)
    return ConfigError(f"{where}: {key} = {str(value)!r}: {reason}")


def _validate_server(server: ServerSettings, path: Path, sources: Mapping[str, str]) -> None:
    def fail(key: str, value: object, reason: str) -> ConfigError:
        return ConfigError(
            f"{_where(path, sources, 'server.' + key)}: server.{key} = {value!r}: {reason}"
        )

    titles = [("ae_title", server.ae_title)]
    titles += [("allowed_calling_aes", aet) for aet in server.allowed_calling_aes]
    for key, value in titles:
        problem = ae_title_problem(value)
        if problem:
            raise fail(key, value, problem)
    if not 1 <= server.port <= 65535:
        raise fail("port", server.port, "must be between 1 and 65535")
    if server.max_associations < 1:
        raise fail("max_associations", server.max_associations, "must be at least 1")
    if server.max_pdu_size != 0 and not 4096 <= server.max_pdu_size <= 2**32 - 1:
        raise fail("max_pdu_size", server.max_pdu_size, "must be 0 (unlimited) or 4096..2^32-1")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        if getattr(server, key) <= 0:
            raise fail(key, getattr(server, key), "must be a positive number of seconds")
    if server.min_free_disk_mb < 0:
        raise fail("min_free_disk_mb", server.min_free_disk_mb, "must not be negative")
    if not 1 <= server.max_instance_mb <= 1024 * 1024:
        raise fail("max_instance_mb", server.max_instance_mb, "must be between 1 and 1048576")
    _validate_tls(server, fail)


def _validate_tls(server: ServerSettings, fail: Callable[[str, object, str], ConfigError]) -> None:
    # Errors name the key that was given (the file line to fix), not the one left out.
    if bool(server.tls_certificate) != bool(server.tls_private_key):
        key, missing = (
            ("tls_certificate", "tls_private_key")
            if server.tls_certificate
            else ("tls_private_key", "tls_certificate")
        )
        raise fail(key, getattr(server, key), f"TLS needs {missing} as well")
    if server.tls_require_client_certificate and not server.tls_ca_certificates:
        raise fail(
            "tls_require_client_certificate",
            True,
            "needs tls_ca_certificates (the CAs client certificates are checked against)",
        )
    for key in ("tls_ca_certificates", "tls_require_client_certificate"):
        if getattr(server, key) and not server.tls_certificate:
            raise fail(key, getattr(server, key), "needs tls_certificate and tls_private_key")
    for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
        value = getattr(server, key)
        if value and not Path(value).expanduser().is_file():
            raise fail(key, value, "file not found")


def ae_title_problem(value: str) -> str | None:
    """Why ``value`` is not a valid AE title (PS3.5 AE VR), or None if it is."""
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return "longer than 16 characters"
    if "\\" in value:
        return "must not contain a backslash"
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        return "must contain only printable ASCII characters"
    return None


def _validate_autoloader(auto: AutoloaderSettings, path: Path, sources: Mapping[str, str]) -> None:
    def fail(key: str, value: object, reason: str) -> ConfigError:
        where = _where(path, sources, "autoloader." + key)
        return ConfigError(f"{where}: autoloader.{key} = {value!r}: {reason}")

    if auto.record_unit not in RECORD_UNITS:
        raise fail("record_unit", auto.record_unit, f"must be one of {', '.join(RECORD_UNITS)}")
    if auto.duplicate_policy not in DUPLICATE_POLICIES:
        raise fail(
            "duplicate_policy",
            auto.duplicate_policy,
            f"must be one of {', '.join(DUPLICATE_POLICIES)}",
        )
    if auto.sweep_interval <= 0:
        raise fail("sweep_interval", auto.sweep_interval, "must be a positive number of seconds")
    if auto.batch_size < 1:
        raise fail("batch_size", auto.batch_size, "must be at least 1")
    # Native pixel data cannot hold a frame over 4 GB (one 32-bit length): no larger bound.
    if not 1 <= auto.max_decoded_frame_mb <= 4096:
        raise fail("max_decoded_frame_mb", auto.max_decoded_frame_mb, "must be between 1 and 4096")
    if "{SOPInstanceUID}" not in auto.path_template:
        raise fail("path_template", auto.path_template, "must contain {SOPInstanceUID}")


def _build_paths(
    values: dict[str, Any], overrides: Overrides, path: Path, sources: dict[str, str]
) -> PathSettings:
    known = set(_PATH_KEYS) | {"database_url", "linkage_database_url"}
    for key, value in values.items():
        if key in known and not isinstance(value, str):
            raise ConfigError(f"{path}: paths.{key} = {value!r} is not a valid str")

    env_data_dir = locations.data_dir_from_environment()
    if overrides.data_dir is not None:
        data_dir = overrides.data_dir.expanduser()
        sources["paths.data_dir"] = "flag"
    elif env_data_dir is not None:
        data_dir = env_data_dir
        sources["paths.data_dir"] = "environment"
    elif "data_dir" in values:
        data_dir = Path(values["data_dir"]).expanduser()
    else:
        data_dir = locations.default_data_dir()
    data_dir = data_dir.absolute()

    def folder(key: str, default: Path) -> Path:
        if key in values:
            given = Path(values[key]).expanduser()
            return given if given.is_absolute() else data_dir / given
        return default

    database_url = values.get("database_url", locations.database_url(data_dir))
    env_url = os.environ.get(locations.DATABASE_URL_ENV)
    if overrides.database_url is not None:
        database_url = overrides.database_url
        sources["paths.database_url"] = "flag"
    elif env_url:
        database_url = env_url
        sources["paths.database_url"] = "environment"
    for key, url in (
        ("database_url", database_url),
        ("linkage_database_url", values.get("linkage_database_url", "sqlite:///")),
    ):
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            where = _where(path, sources, f"paths.{key}")
            raise ConfigError(
                f"{where}: paths.{key} = {url!r}: must start with sqlite:/// or postgresql://"
            )

    return PathSettings(
        data_dir=data_dir,
        incoming=folder("incoming", locations.incoming_dir(data_dir)),
        archive=folder("archive", locations.archive_dir(data_dir)),
        quarantine=folder("quarantine", locations.quarantine_dir(data_dir)),
        originals=folder("originals", locations.originals_dir(data_dir)),
        spool=folder("spool", locations.spool_dir(data_dir)),
        logs=folder("logs", locations.log_dir(data_dir)),
        database_url=database_url,
        linkage_database_url=values.get(
            "linkage_database_url", locations.linkage_database_url(data_dir)
        ),
    )
