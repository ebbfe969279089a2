"""A real FHIR R4 server for tests: sekmet-fhir (SQLite, validates against the R4 models), in .venv-fhir.

``scripts/setup --test`` installs it. Each server listens on 127.0.0.1 and a free port, keeps its
database in the test's tmp dir (so it survives a stop/start within a test), and is stopped by the
fixture that started it.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEKMET = ROOT / ".venv-fhir" / "bin" / "sekmet"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FhirServer:
    """``sekmet serve`` with a settings file written for one test."""

    def __init__(self, folder: Path, *, validation: str = "strict", port: int | None = None,
                 tokens: list[str] | None = None, users: dict[str, str] | None = None, tls: bool = False) -> None:
        if not SEKMET.exists():
            pytest.fail(f"{SEKMET} is missing: run scripts/setup --test (it installs sekmet-fhir into .venv-fhir)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.tls = tls
        self.ca_bundle: Path | None = None
        scheme = "https" if tls else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}/fhir"
        self.tokens = tokens or []
        self.users = users or {}
        self.validation = validation
        self.log_path = folder / "sekmet.log"
        self.process: subprocess.Popen[bytes] | None = None
        if tls:
            subprocess.run([str(SEKMET), "keys", "tls-cert", "--out", str(folder / "tls"), "127.0.0.1"],
                           cwd=folder, check=True, capture_output=True, timeout=60)
            self.ca_bundle = folder / "tls.crt"
        self._write_settings()

    def _write_settings(self) -> None:
        types = []
        if self.tokens:
            types.append("bearer")
        if self.users:
            types.append("basic")
        lines = [
            f"base_url: {self.base_url}",
            "host: 127.0.0.1",
            f"port: {self.port}",
            f"data_dir: {self.folder / 'data'}",
            "simulator: {enabled: false}",
            f"validation: {{inbound: '{self.validation}'}}",  # quoted: YAML reads a bare off as false
            f"own_private_key_path: {self.folder / 'keys' / 'sekmet_private.pem'}",
            "server_auth:",
            f"  types: [{', '.join(types or ['none'])}]",
            f"  tokens: [{', '.join(self.tokens)}]",
            "  users: {" + ", ".join(f"{u}: {p}" for u, p in self.users.items()) + "}",
        ]
        if self.tls:
            lines += [f"tls_certfile: {self.folder / 'tls.crt'}", f"tls_keyfile: {self.folder / 'tls.key'}"]
        (self.folder / "settings.yaml").write_text("\n".join(lines) + "\n")

    def set_validation(self, validation: str) -> None:
        """Takes effect at the next start."""
        self.validation = validation
        self._write_settings()

    def start(self, timeout: float = 30) -> "FhirServer":
        log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
        self.process = subprocess.Popen([str(SEKMET), "serve", "-c", str(self.folder / "settings.yaml")],
                                        cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"sekmet exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if self.client().get("/metadata").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sekmet did not answer /fhir/metadata within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)  # uvicorn waits for open keep-alive connections: not for long
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- reading what the server holds ------------------------------------------------------

    def client(self) -> httpx.Client:
        headers = {"Accept": "application/fhir+json"}
        auth = None
        if self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[0]}"
        elif self.users:
            user, password = next(iter(self.users.items()))
            auth = httpx.BasicAuth(user, password)
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.ca_bundle)) if self.ca_bundle \
            else True
        return httpx.Client(base_url=self.base_url, headers=headers, auth=auth, timeout=10, verify=verify)

    def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """Every match of a search (one page of up to 500)."""
        with self.client() as client:
            answer = client.get(f"/{resource_type}", params={**params, "_count": "500"})
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        assert bundle.get("total", 0) <= 500
        return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        with self.client() as client:
            answer = client.get(f"/{resource_type}/{resource_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def history(self, resource_type: str, resource_id: str) -> list[dict[str, Any]]:
        with self.client() as client:
            answer = client.get(f"/{resource_type}/{resource_id}/_history")
        assert answer.status_code == 200, answer.text
        return [e.get("resource", {}) for e in answer.json().get("entry", [])]

    def all(self, resource_type: str) -> list[dict[str, Any]]:
        return self.search(resource_type)
