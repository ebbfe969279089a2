"""Shared test machinery: a real `imagingstudy-scp serve` process and DCMTK clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scp.fhir_version import FhirVersion  # noqa: E402
from scp.header import read_header  # noqa: E402
from scp.index import Index  # noqa: E402
from scp.store import Store  # noqa: E402
from scp.validation import imaging_study_problems  # noqa: E402

AET = "IMAGINGSTUDY"

# storescu proposes one family of transfer syntaxes per run: the option that puts a file's own
# transfer syntax first, so that nothing is converted on the way.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def wait_for(predicate: Callable[[], Any], timeout: float = 20, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class RunningSCP:
    """`python -m scp serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = args
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20) -> "RunningSCP":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scp", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(self.data_dir), *self.args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

        def listening() -> int | None:
            if self.process and self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log()}")
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log()[offset:])
            return int(match.group(1)) if match else None

        self.port = wait_for(listening, timeout, what="serve to listen")
        return self

    def stop(self, timeout: float = 20) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def study_path(self, study_uid: str) -> Path:
        return self.data_dir / "fhir" / "ImagingStudy" / f"{study_uid}.json"

    def read_study(self, study_uid: str) -> dict[str, Any] | None:
        try:
            return orjson.loads(self.study_path(study_uid).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None

    def wait_for_study(self, study_uid: str, instances: int | None = None, timeout: float = 20) -> dict[str, Any]:
        """The published ImagingStudy, once it holds ``instances`` instances (if given)."""
        def ready() -> dict[str, Any] | None:
            study = self.read_study(study_uid)
            if study is None or (instances is not None and study.get("numberOfInstances") != instances):
                return None
            return study
        return wait_for(ready, timeout, what=f"ImagingStudy {study_uid} with {instances} instances")


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Callable[..., RunningSCP]]:
    """Start servers with extra `serve` arguments; all are stopped after the test."""
    started: list[RunningSCP] = []

    def start(*args: str, data_dir: Path | None = None) -> RunningSCP:
        server = RunningSCP(data_dir or tmp_path / "data", *args).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A file store in a fresh data dir, without fsync (for tests of the store and index in-process)."""
    return Store(tmp_path / "data", fsync=False)


@pytest.fixture
def index(store: Store) -> Iterator[Index]:
    """The index of :func:`store`'s data dir."""
    idx = Index(store.data_dir / "index.sqlite3")
    yield idx
    idx.close()


@pytest.fixture
def running_scp(scp_factory: Callable[..., RunningSCP]) -> RunningSCP:
    return scp_factory()


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"DCMTK's {tool} is not installed: scripts/test installs the dcmtk package")
    return path


def transfer_syntax_groups(files: Iterable[Path]) -> dict[str, list[Path]]:
    """Files grouped by transfer syntax, groups and files in first-seen order (storescu's send order)."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(read_header(path).transfer_syntax_uid, []).append(path)
    return groups


def send_order(files: Iterable[Path]) -> list[Path]:
    """The order in which :func:`storescu` sends ``files``."""
    return [path for members in transfer_syntax_groups(files).values() for path in members]


def storescu(port: int, files: Iterable[Path], *, aec: str = AET, aet: str = "STORESCU",
             extra: Iterable[str] = (), check: bool = True) -> list[subprocess.CompletedProcess[str]]:
    """Send ``files`` with DCMTK storescu, one association per transfer syntax (see :func:`send_order`)."""
    results = []
    for ts, members in transfer_syntax_groups(files).items():
        result = subprocess.run(
            [dcmtk("storescu"), "-aec", aec, "-aet", aet, STORESCU_TS_OPTION[ts], "-R", *extra,
             "127.0.0.1", str(port), *map(str, members)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
        )
        if check and result.returncode != 0:
            pytest.fail(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        results.append(result)
    return results


def assert_valid(resource: dict[str, Any], version: FhirVersion = FhirVersion.R6) -> None:
    """Schema of the version, ist-1..ist-6 and the status value set (see scp.validation)."""
    problems = imaging_study_problems(resource, version)
    assert problems == [], "\n".join(problems)


class ReferenceStorescp:
    """DCMTK's storescp in bit-preserving mode: writes each dataset exactly as it was received.

    Sending the same files to it and to us with the same storescu command shows
    what storescu really put on the wire (it re-encodes some files, e.g. drops
    group lengths), so our stored bytes can be compared with that.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [dcmtk("storescp"), "+B", "+xa", "-aet", AET, "-od", str(folder), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for(self._answers, 20, what="storescp to listen")

    def _answers(self) -> bool:
        echo = subprocess.run([dcmtk("echoscu"), "-aec", AET, "127.0.0.1", str(self.port)],
                              capture_output=True, timeout=10)
        return echo.returncode == 0

    def received(self) -> dict[str, Path]:
        """SOP Instance UID → the file storescp wrote."""
        return {read_header(p).sop_uid: p for p in self.folder.iterdir() if p.is_file()}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def temp_leftovers(data_dir: Path) -> list[Path]:
    """Files in ``<data-dir>/tmp`` other than the empty spare files the server keeps ready
    (scp.temp_files): what a failed or interrupted receive left behind."""
    tmp = data_dir / "tmp"
    if not tmp.exists():
        return []
    return sorted(p for p in tmp.iterdir()
                  if not (p.name.startswith("spare-") and p.is_file() and p.stat().st_size == 0))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def reference_storescp(tmp_path: Path) -> Iterator[ReferenceStorescp]:
    reference = ReferenceStorescp(tmp_path / "storescp")
    yield reference
    reference.stop()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    folder = tmp_path / "pki"
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test CA", cwd=folder)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=folder)
        (folder / f"{name}.ext").write_text(extra + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder
