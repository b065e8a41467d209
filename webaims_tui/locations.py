"""Every path the program uses, built on platformdirs.

Each function returns the default; the settings loader lets the config file, a flag or an
environment variable override any of them (see :mod:`webaims_tui.config`).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "webaims-tui"

CONFIG_ENV = "WEBAIMS_CONFIG"
DATA_DIR_ENV = "WEBAIMS_DATA_DIR"
DATABASE_URL_ENV = "WEBAIMS_DATABASE_URL"


def default_config_file() -> Path:
    """The TOML config file, at the platform's user config location."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_data_dir() -> Path:
    """The folder holding incoming/, archive/, quarantine/, the database and logs."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def config_file_from_environment() -> Path | None:
    value = os.environ.get(CONFIG_ENV)
    return Path(value).expanduser() if value else None


def data_dir_from_environment() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def incoming_dir(data_dir: Path) -> Path:
    return data_dir / "incoming"


def archive_dir(data_dir: Path) -> Path:
    return data_dir / "archive"


def quarantine_dir(data_dir: Path) -> Path:
    return data_dir / "quarantine"


def originals_dir(data_dir: Path) -> Path:
    return data_dir / "originals"


def spool_dir(data_dir: Path) -> Path:
    """Where received bytes are written before the atomic rename into incoming/.

    It lives beside incoming/ (same file system, so the rename is atomic) but is never watched.
    """
    return data_dir / "spool"


def log_dir(data_dir: Path) -> Path:
    return data_dir / "logs"


def database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'webaims.sqlite3'}"


def linkage_database_url(data_dir: Path) -> str:
    """The pseudonym linkage lives apart from the archive database so the archive can be shared."""
    return f"sqlite:///{data_dir / 'linkage.sqlite3'}"


def site_secret_file(data_dir: Path) -> Path:
    return data_dir / "site-secret.key"


def stylesheet_path() -> Path:
    """The app's TCSS: packaged inside the wheel, or at the top of a source checkout."""
    packaged = Path(__file__).parent / "styles" / "app.tcss"
    if packaged.exists():
        return packaged
    return Path(__file__).parent.parent / "styles" / "app.tcss"
