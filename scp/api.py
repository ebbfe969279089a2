"""The Python API for integration tests: an embedded Storage SCP on a free loopback port.

    from scp import StorageSCP

    with StorageSCP(tmp_path) as scp:
        subprocess.run(["storescu", "-aec", scp.aet, "+sd", "127.0.0.1", str(scp.port), "study/"], check=True)
        study = scp.wait_for_study(study_uid, timeout=10)

The server runs in this process (threads), with the settings given here only: neither
``IMAGINGSTUDY_SCP_*`` variables nor a config file in the working directory are read.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from scp.settings import load_settings


class StudyNotPublished(TimeoutError):
    """The study's ImagingStudy did not appear (with the expected content) in time."""


class StorageSCP:
    """An embedded imagingstudy-scp server; a context manager that starts and stops it."""

    def __init__(self, data_dir: str | Path, *, aet: str = "IMAGINGSTUDY", host: str = "127.0.0.1",
                 port: int = 0, fhir_version: str | None = None, **settings: Any) -> None:
        flags = {"data_dir": Path(data_dir), "aet": aet, "host": host, "port": port, **settings}
        if fhir_version is not None:
            flags["fhir_version"] = fhir_version
        self._settings = load_settings(
            flags,
            search_default=False, environment=False,
        )
        self._server: Any = None

    @property
    def aet(self) -> str:
        return self._settings.aet

    @property
    def host(self) -> str:
        return self._settings.host

    @property
    def port(self) -> int:
        """The port actually bound (a free one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("StorageSCP is not started")
        return int(self._server.port)

    @property
    def data_dir(self) -> Path:
        return Path(self._settings.data_dir).resolve()

    def start(self) -> "StorageSCP":
        from scp.server import Server

        self._server = Server(self._settings)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_study(self, study_uid: str, timeout: float = 10.0, *, instances: int | None = None) -> dict[str, Any]:
        """The published ImagingStudy of the study, once it covers everything stored for it.

        Waits until the resource exists and counts every instance the index holds for the study
        (or exactly ``instances``, when given); raises :class:`StudyNotPublished` after ``timeout``.
        """
        path = self.data_dir / "fhir" / "ImagingStudy" / f"{study_uid}.json"
        deadline = time.monotonic() + timeout
        while True:
            resource = _read(path)
            expected = instances if instances is not None else self._stored_count(study_uid)
            if resource is not None and expected and resource.get("numberOfInstances") == expected:
                return resource
            if time.monotonic() > deadline:
                got = resource.get("numberOfInstances") if resource else None
                raise StudyNotPublished(f"study {study_uid}: ImagingStudy with {expected} instances not published "
                                        f"within {timeout}s (latest has {got})")
            time.sleep(0.02)

    def stored_files(self, study_uid: str) -> list[Path]:
        """The stored instance files of a study, in index order (oldest first)."""
        if self._server is None:
            raise RuntimeError("StorageSCP is not started")
        return [self.data_dir / i.path for i in self._server.index.study_instances(study_uid)]

    def _stored_count(self, study_uid: str) -> int:
        return len(self._server.index.study_instances(study_uid)) if self._server is not None else 0


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
