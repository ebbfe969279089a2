"""Every option of the server in one settings model: flags > environment > config file > defaults.

The config file is TOML (``--config PATH``, else ``imagingstudy-scp.toml`` in the working directory when
present) with the same flat keys as the flags (``port = 11112``, ``fhir_version = "R4"``); environment
variables are the keys upper-cased with the ``IMAGINGSTUDY_SCP_`` prefix. Everything is validated when the
settings are built, and a bad value fails with a message that names its key.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import ipaddress
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from scp.fhir_version import FhirVersion

ENV_PREFIX = "IMAGINGSTUDY_SCP_"
DEFAULT_CONFIG_FILE = "imagingstudy-scp.toml"
SECRET_KEYS: frozenset[str] = frozenset({"fhir_token", "fhir_password"})  # keys whose values `config` masks

_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5: default repertoire, no backslash, at most 16
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)
_use_environment: contextvars.ContextVar[bool] = contextvars.ContextVar("use_environment", default=True)


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names the key."""


class CallingAESetting(BaseModel):
    """One allow-list entry: a calling AE title, optionally only from some hosts/networks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aet: str
    hosts: list[str] = Field(default_factory=list, description="addresses or networks (CIDR); empty = any")

    @field_validator("hosts")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{host!r} is not an IP address or network") from exc
        return value


class Settings(BaseSettings):
    """The server's configuration. Field names are the config keys, the flags and the env suffixes."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      validate_default=True, case_sensitive=False)

    # DICOM listener
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(11112, ge=0, le=65535, description="DICOM port (0 = any free port)")
    aet: str = Field("IMAGINGSTUDY", description="our AE title")
    max_pdu_size: int = Field(131072, ge=0, description="largest PDU we accept (0 = unlimited)")
    max_associations: int = Field(32, ge=1, description="concurrent associations; more are rejected (transient)")
    acse_timeout: float = Field(30, gt=0, description="seconds to wait for association messages")
    dimse_timeout: float = Field(60, gt=0, description="seconds to wait for DIMSE messages")
    network_timeout: float = Field(60, gt=0, description="seconds without network activity before closing "
                                   "(not counted while a C-STORE is being stored)")
    stop_grace: float = Field(5, ge=0, description="on stop: seconds open associations get to end on their own "
                              "before they are aborted")
    workers: int = Field(1, ge=1, le=64, description="processes receiving associations on the DICOM port(s); more "
                         "than 1 lets parallel associations use several CPU cores")
    event_driven_transport: bool = Field(
        True, description="event-driven waits instead of pynetdicom's 1 ms polling (scp/transport.py; applied only "
        "to the pynetdicom version it was written for)")
    # AE title policy
    accept_any_called_aet: bool = Field(False, description="accept associations whatever AE title they call")
    calling_aets: list[CallingAESetting] = Field(
        default_factory=list, description="allow-list of calling AE titles (with optional hosts); empty = anyone")
    # DICOM TLS (a second listener beside the plain one)
    tls_port: int | None = Field(None, ge=0, le=65535, description="DICOM TLS port (conventionally 2762)")
    tls_cert: Path | None = Field(None, description="server certificate (PEM)")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_ca: Path | None = Field(None, description="CA bundle that client certificates are verified against")
    tls_require_client_cert: bool = Field(False, description="refuse TLS clients without a trusted certificate")
    # storage
    data_dir: Path = Field(Path("scp-data"), description="studies, index and published resources")
    fsync: bool = Field(True, description="fsync files and directories before acknowledging")
    min_free_disk_mb: int = Field(100, ge=0, description="below this free space C-STORE answers 0xA700")
    max_instance_size_mb: int = Field(0, ge=0, description="larger instances are refused with 0xA700 (0 = no limit)")
    duplicate_policy: Literal["replace", "keep-first", "reject"] = Field(
        "replace", description="an instance whose SOP Instance UID is already stored: replace it (latest wins), "
        "keep the first, or reject the new one")
    # ImagingStudy
    fhir_version: FhirVersion | None = Field(
        None, description="R6, R5 or R4; unset = R6 for the directory sink, the server's own for a FHIR server")
    wado_rs_url: str | None = Field(None, description="DICOMweb WADO-RS base URL for ImagingStudy.endpoint")
    timezone: str | None = Field(None, description="IANA zone for DICOM times without an offset (default: host)")
    # FHIR servers (scp/sinks/fhir_server.py) and the outbox in front of every sink (scp/outbox.py)
    fhir_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="FHIR server base URLs to publish to (env: one URL, several separated by "
        "commas or spaces, or a JSON list)")
    fhir_token: str | None = Field(None, description="bearer token for the FHIR servers")
    fhir_token_file: Path | None = Field(None, description="file holding the bearer token (first line)")
    fhir_username: str | None = Field(None, description="HTTP basic user for the FHIR servers")
    fhir_password: str | None = Field(None, description="HTTP basic password for the FHIR servers")
    fhir_ca_bundle: Path | None = Field(None, description="CA bundle (PEM) that FHIR server certificates are "
                                        "verified against (default: the system's)")
    fhir_timeout: float = Field(30, gt=0, description="seconds for one FHIR request (connect, read, write)")
    patient_id_system: str = Field("urn:imagingstudy-scp:unidentified-patient", description="identifier system "
                                   "of the Patient of a study without Patient ID (value: the Study Instance UID)")
    outbox_initial_delay: float = Field(1, gt=0, description="seconds before the first retry of a failed delivery")
    outbox_max_delay: float = Field(300, gt=0, description="cap of the exponential retry delay, in seconds")
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

    @field_validator("fhir_url", mode="before")
    @classmethod
    def _split_fhir_urls(cls, value: Any) -> Any:
        """The environment gives one string: a JSON list, or URLs separated by commas or spaces."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list of URLs: {exc}") from None
            return [part for part in re.split(r"[,\s]+", text) if part]
        return value

    @field_validator("fhir_url")
    @classmethod
    def _fhir_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.match(r"https?://\S+$", url):
                raise ValueError(f"{url!r} is not an http(s) URL")
        if len({url.rstrip("/") for url in value}) != len(value):
            raise ValueError("the same FHIR server is listed twice")
        return [url.rstrip("/") for url in value]

    @model_validator(mode="after")
    def _fhir_auth(self) -> "Settings":
        if self.fhir_token is not None and self.fhir_token_file is not None:
            raise ValueError("fhir_token and fhir_token_file: set one, not both")
        if (self.fhir_username is None) != (self.fhir_password is None):
            raise ValueError("fhir_username and fhir_password go together")
        if self.fhir_username is not None and (self.fhir_token or self.fhir_token_file):
            raise ValueError("FHIR auth: bearer token or basic user/password, not both")
        if self.fhir_token_file is not None and not self.fhir_token_file.is_file():
            raise ValueError(f"fhir_token_file: {self.fhir_token_file} does not exist")
        if self.fhir_ca_bundle is not None and not self.fhir_ca_bundle.is_file():
            raise ValueError(f"fhir_ca_bundle: {self.fhir_ca_bundle} does not exist")
        return self

    def directory_fhir_version(self) -> FhirVersion:
        """The release the directory sink (and `show`) writes: ``fhir_version``, else R6."""
        return self.fhir_version or FhirVersion.R6

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"{value!r} is not a known IANA time zone") from exc
        return value

    @model_validator(mode="after")
    def _tls_complete(self) -> "Settings":
        if self.tls_port is not None and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_port needs tls_cert and tls_key")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("tls_require_client_cert needs tls_ca (the CA that signs client certificates)")
        return self

    def local_zone(self) -> dt.tzinfo:
        """The zone for DICOM times that carry no Timezone Offset From UTC."""
        if self.timezone is None:
            return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc
        return zoneinfo.ZoneInfo(self.timezone)

    def effective(self) -> dict[str, Any]:
        """Every key with its value as the server uses it, secrets masked (for `config`)."""
        values = self.model_dump(mode="json")
        values["fhir_url"] = [_mask_password(url) for url in values["fhir_url"]]
        return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in values.items()}


def _mask_password(url: str) -> str:
    """``url`` with the password of a user:password@ part replaced by ***."""
    return re.sub(r"^(https?://[^/@:]*):[^/@]*@", r"\1:***@", url)


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
