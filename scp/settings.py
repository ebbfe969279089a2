"""Every option of the server in one place, checked when it is built."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

from scp.fhir_version import FhirVersion

_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5: 16 chars of default repertoire, no backslash


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    """The server's configuration (flags now; a config file and environment later)."""

    host: str = "0.0.0.0"
    port: int = 11112
    aet: str = "IMAGINGSTUDY"
    data_dir: Path = Path("scp-data")
    fhir_version: FhirVersion = FhirVersion.R6
    wado_rs_url: str | None = None
    timezone: str | None = None  # IANA name for DICOM times without an offset; None = the host's zone
    fsync: bool = True
    max_pdu_size: int = 131072
    log_level: str = "INFO"
    log_phi: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port: {self.port} is not a TCP port (0-65535)")
        if not _AET.fullmatch(self.aet) or not self.aet.strip():
            raise SettingsError(f"aet: {self.aet!r} is not a valid AE title (1-16 printable ASCII, no backslash)")
        if self.wado_rs_url is not None and not re.match(r"https?://\S+$", self.wado_rs_url):
            raise SettingsError(f"wado_rs_url: {self.wado_rs_url!r} is not an http(s) URL")
        if self.max_pdu_size != 0 and self.max_pdu_size < 4096:
            raise SettingsError(f"max_pdu_size: {self.max_pdu_size} is too small (at least 4096, or 0 for unlimited)")
        self.local_zone()  # raises SettingsError for an unknown zone

    def local_zone(self) -> dt.tzinfo:
        """The zone for DICOM times that carry no Timezone Offset From UTC."""
        if self.timezone is None:
            return dt.datetime.now().astimezone().tzinfo or dt.timezone.utc
        try:
            return zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise SettingsError(f"timezone: {self.timezone!r} is not a known IANA time zone") from exc
