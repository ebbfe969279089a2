"""Every option of the server in one settings model: flags > environment > config file > defaults.

The config file is TOML (``--config PATH``, else ``imagingstudy-scp.toml`` in the working directory when
present) with the same flat keys as the flags (``port = 11112``, ``fhir_version = "R4"``); environment
variables are the keys upper-cased with the ``IMAGINGSTUDY_SCP_`` prefix. Everything is validated when the
settings are built, and a bad value fails with a message that names its key.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from scp.fhir_version import FhirVersion

ENV_PREFIX = "IMAGINGSTUDY_SCP_"
DEFAULT_CONFIG_FILE = "imagingstudy-scp.toml"
SECRET_KEYS: frozenset[str] = frozenset()  # keys whose values `config` masks

_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5: default repertoire, no backslash, at most 16
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)
_use_environment: contextvars.ContextVar[bool] = contextvars.ContextVar("use_environment", default=True)


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names the key."""


class Settings(BaseSettings):
    """The server's configuration. Field names are the config keys, the flags and the env suffixes."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      validate_default=True, case_sensitive=False)

    # DICOM listener
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(11112, ge=0, le=65535, description="DICOM port (0 = any free port)")
    aet: str = Field("IMAGINGSTUDY", description="our AE title")
    max_pdu_size: int = Field(131072, ge=0, description="largest PDU we accept (0 = unlimited)")
    # storage
    data_dir: Path = Field(Path("scp-data"), description="studies, index and published resources")
    fsync: bool = Field(True, description="fsync files and directories before acknowledging")
    min_free_disk_mb: int = Field(100, ge=0, description="below this free space C-STORE answers 0xA700")
    duplicate_policy: Literal["replace", "keep-first", "reject"] = Field(
        "replace", description="an instance whose SOP Instance UID is already stored: replace it (latest wins), "
        "keep the first, or reject the new one")
    # ImagingStudy
    fhir_version: FhirVersion = Field(FhirVersion.R6, description="R6, R5 or R4")
    wado_rs_url: str | None = Field(None, description="DICOMweb WADO-RS base URL for ImagingStudy.endpoint")
    timezone: str | None = Field(None, description="IANA zone for DICOM times without an offset (default: host)")
    # HTTP admin listener (/healthz, /readyz, /metrics)
    http_port: int | None = Field(None, ge=0, le=65535, description="admin HTTP port (off unless set)")
    http_host: str = Field("127.0.0.1", description="admin HTTP address")
    # logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="human-readable text or JSON lines")
    log_phi: bool = Field(False, description="allow patient-identifying values in logs")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if _use_environment.get():
            sources.append(env_settings)
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @field_validator("fhir_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return FhirVersion.parse(value) if isinstance(value, str) else value

    @field_validator("aet")
    @classmethod
    def _aet(cls, value: str) -> str:
        if not _AET.fullmatch(value) or not value.strip():
            raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
        return value

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu(cls, value: int) -> int:
        if 0 < value < 4096:
            raise ValueError(f"{value} is too small (at least 4096, or 0 for unlimited)")
        return value

    @field_validator("wado_rs_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://\S+$", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"{value!r} is not a known IANA time zone") from exc
        return value

    def local_zone(self) -> dt.tzinfo:
        """The zone for DICOM times that carry no Timezone Offset From UTC."""
        if self.timezone is None:
            return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc
        return zoneinfo.ZoneInfo(self.timezone)

    def effective(self) -> dict[str, Any]:
        """Every key with its value as the server uses it, secrets masked (for `config`)."""
        values = self.model_dump(mode="json")
        return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in values.items()}


def load_settings(flags: Mapping[str, Any] | None = None, config_file: Path | None = None,
                  *, search_default: bool = True, environment: bool = True) -> Settings:
    """Build the settings from flags (only those given), the environment and the config file.

    ``config_file`` None means ``imagingstudy-scp.toml`` in the working directory when it exists
    (unless ``search_default`` is False); ``environment`` False ignores ``IMAGINGSTUDY_SCP_*``
    variables (an embedded server in a test should not pick up the host's settings).
    Raises :class:`SettingsError` naming every bad key.
    """
    if config_file is None and search_default and Path(DEFAULT_CONFIG_FILE).is_file():
        config_file = Path(DEFAULT_CONFIG_FILE)
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config: {config_file} does not exist")
    token = _config_file.set(config_file)
    env_token = _use_environment.set(environment)
    try:
        return Settings(**dict(flags or {}))
    except ValidationError as exc:
        raise SettingsError(_explain(exc, config_file)) from None
    except ValueError as exc:  # e.g. a TOML syntax error
        raise SettingsError(f"config: {config_file}: {exc}") from None
    finally:
        _config_file.reset(token)
        _use_environment.reset(env_token)


def _explain(error: ValidationError, config_file: Path | None) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "settings"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = f"unknown setting (in {config_file or 'the arguments'})"
        lines.append(f"{key}: {message}")
    return "invalid configuration: " + "; ".join(lines)
