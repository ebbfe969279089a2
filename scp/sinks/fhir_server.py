"""The FHIR server sink: one transaction Bundle per study, POSTed to the server's base URL.

The bundle (see :mod:`scp.sinks.fhir_bundle`) creates the Patient and the WADO-RS Endpoint only
if none exists yet and updates the ImagingStudy that carries the study's UID, so delivering a
study again is safe: it never duplicates anything, it adds a version.

The FHIR release of the payload is ``fhir_version`` when configured, else the server's own,
read once from its CapabilityStatement (``GET [base]/metadata``: ``fhirVersion`` 4.x → R4,
5.x → R5, 6.x → R6).

A study left without stored instances is withdrawn with a conditional delete of the resource the
bundle updates (``DELETE [base]/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``): 200, 202 and
204, and 404/410 (nothing there any more), count as withdrawn; other answers are classified as for
the transaction, except 501 (the server does not implement the delete), which dead-letters. The
Patient and the Endpoint stay: other studies may point at them, and they carry nothing of the
withdrawn study's instances.

Failures are classified for the outbox: no answer (connection refused, timeout, TLS failure) and
any status but 2xx are retryable, except 4xx other than 408, 409, 412 and 429, which mean the
server will refuse this payload again: those dead-letter the publication, with the server's
OperationOutcome.
"""

from __future__ import annotations

import email.utils
import logging
import re
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from scp.fhir_version import FhirVersion
from scp.sinks.base import Delivery, DeliveryError, Publication
from scp.sinks.fhir_bundle import BuiltBundle, imaging_study_url, transaction_bundle

log = logging.getLogger("scp.sinks.fhir_server")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request: our "publication" record says more

FHIR_JSON = "application/fhir+json"
RETRYABLE_4XX = frozenset({408, 409, 412, 429})
DELETED = frozenset({200, 202, 204})  # a conditional delete that removed the match (or found none: 204)
ALREADY_GONE = frozenset({404, 410})  # nothing to delete: the server holds nothing for the study
_LOCATION = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([^/?#]+))?/?(?:[?#].*)?$")


def sink_name(base_url: str) -> str:
    """``fhir:<base URL>`` without any user:password part (it names metrics, logs and outbox rows)."""
    return "fhir:" + _without_credentials(base_url)


def _without_credentials(base_url: str) -> str:
    """``base_url`` without a trailing slash and without any user:password part (for names and messages)."""
    parts = urlsplit(base_url.rstrip("/"))
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def retryable_status(status: int) -> bool:
    """Whether an HTTP status may turn into a success by trying again."""
    return not (400 <= status < 500) or status in RETRYABLE_4XX


class FhirServerSink:
    """Publishes each study to one FHIR server as a transaction."""

    def __init__(self, base_url: str, *, version: FhirVersion | None = None, token: str | None = None,
                 token_file: Path | None = None, username: str | None = None, password: str | None = None,
                 ca_bundle: Path | None = None, timeout: float = 30.0, log_phi: bool = False) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = sink_name(self.base_url)
        self.shown_url = _without_credentials(self.base_url)  # for messages
        self._configured = version
        self._discovered: FhirVersion | None = None
        self._token = token
        self._token_file = token_file
        self._log_phi = log_phi
        verify: ssl.SSLContext | bool = True
        if ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(ca_bundle))
        auth = httpx.BasicAuth(username, password or "") if username is not None else None
        self._client = httpx.Client(timeout=timeout, verify=verify, auth=auth, follow_redirects=False,
                                    headers={"Accept": FHIR_JSON, "User-Agent": "imagingstudy-scp"})

    def close(self) -> None:
        self._client.close()

    # -- the FHIR release -----------------------------------------------------------------

    def fhir_version(self) -> FhirVersion:
        """The configured release, else the server's (asked once; raises DeliveryError when it can't say)."""
        if self._configured is not None:
            return self._configured
        if self._discovered is None:
            answer = self._request("GET", f"{self.base_url}/metadata")
            if not 200 <= answer.status_code < 300:
                raise self._refusal(answer, "CapabilityStatement")
            try:
                declared = _json(answer).get("fhirVersion")
                self._discovered = FhirVersion.parse(str(declared))
            except (ValueError, AttributeError) as exc:
                raise DeliveryError(f"{self.shown_url}/metadata: no usable fhirVersion ({exc})", retryable=False,
                                    status=answer.status_code) from None
            log.info("FHIR server %s speaks FHIR %s (CapabilityStatement.fhirVersion)", self.shown_url,
                     self._discovered)
        return self._discovered

    # -- publishing --------------------------------------------------------------------------

    def publish(self, publication: Publication) -> Delivery:
        built = transaction_bundle(publication.study_uid, publication.resource,
                                   [i.header for i in publication.instances], publication.version,
                                   log_phi=self._log_phi)
        for warning in built.warnings:
            log.warning("%s", warning)
        problems = _bundle_problems(built, publication.version)
        if problems:
            raise DeliveryError(f"the {publication.version} transaction for study {publication.study_uid} is "
                                f"invalid (not sent): {'; '.join(problems)}", retryable=False,
                                fields={"sent": built.requests})
        started = time.monotonic()
        answer = self._request("POST", self.base_url, content=orjson.dumps(built.bundle),
                               headers={"Content-Type": FHIR_JSON, "Prefer": "return=minimal"},
                               sent=built.requests)
        seconds = time.monotonic() - started
        if not 200 <= answer.status_code < 300:
            raise self._refusal(answer, "transaction", sent=built.requests)
        entries = _response_entries(answer, built.requests)
        failed = [e for e in entries if e["status"] is not None and not e["status"].startswith("2")]
        if failed:
            status = int(failed[0]["status"][:3]) if failed[0]["status"][:3].isdigit() else None
            raise DeliveryError(f"{self.shown_url}: transaction answered {answer.status_code} but entries failed: "
                                f"{failed}", retryable=status is None or retryable_status(status), status=status,
                                fields={"sent": built.requests, "entries": entries})
        shown = ", ".join(f"{e['resource'] or e['request']} v{e['version'] or '?'} ({e['status'] or '?'})"
                          for e in entries)
        return Delivery(self.name, f"{self.shown_url} {answer.status_code} in {seconds:.3f}s: {shown}",
                        fields={"url": self.shown_url, "status": answer.status_code, "sent": built.requests,
                                "entries": entries, "request_seconds": round(seconds, 6)})

    # -- withdrawing ------------------------------------------------------------------------

    def withdraw(self, study_uid: str) -> Delivery:
        """Delete the study's ImagingStudy by conditional delete on its identifier (the server chose its id).

        Same auth, TLS, timeout and failure classification as :meth:`publish` (but 501, no delete on
        this server, dead-letters); a server that holds nothing for the study (404, 410, or a 204
        without a match) has what we want. A conditional delete rather than a search, then a delete
        by id: one request, with no window between finding the resource and deleting it.
        """
        url = imaging_study_url(study_uid)
        sent = [f"DELETE {url}"]
        started = time.monotonic()
        answer = self._request("DELETE", f"{self.base_url}/{url}", sent=sent)
        seconds = time.monotonic() - started
        status = answer.status_code
        if status not in DELETED and status not in ALREADY_GONE:
            refusal = self._refusal(answer, "conditional delete", sent=sent)
            if status == 501:  # no (conditional) delete on this server, ever: a dead letter, not an outage
                refusal.retryable = False
            raise refusal
        said = {200: "deleted", 202: "deletion accepted", 204: "deleted, or none there"}.get(status, "already gone")
        return Delivery(self.name, f"{self.shown_url} {status} in {seconds:.3f}s: {sent[0]} ({said})",
                        fields={"url": self.shown_url, "status": status, "sent": sent,
                                "request_seconds": round(seconds, 6)})

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, url: str, *, content: bytes | None = None,
                 headers: dict[str, str] | None = None, sent: Sequence[str] = ()) -> httpx.Response:
        headers = dict(headers or {})
        token = self._bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            return self._client.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:  # no answer: connection refused, timeout, TLS, protocol error
            said = f"{method} {url}: {type(exc).__name__}: {exc}".replace(self.base_url, self.shown_url)
            raise DeliveryError(said, retryable=True,
                                fields={"sent": list(sent)} if sent else None) from None

    def _bearer(self) -> str | None:
        """The token; a token file is read for every request, so a rotated token is picked up."""
        if self._token_file is not None:
            try:
                lines = self._token_file.read_text().strip().splitlines()
            except OSError as exc:
                raise DeliveryError(f"bearer token file {self._token_file}: {exc}", retryable=True) from None
            return lines[0].strip() if lines else None
        return self._token

    def _refusal(self, answer: httpx.Response, what: str, sent: Sequence[str] = ()) -> DeliveryError:
        """A DeliveryError for a non-2xx answer, with the server's OperationOutcome if it sent one."""
        status = answer.status_code
        outcome: dict[str, Any] | None = None
        try:
            body = _json(answer)
            if body.get("resourceType") == "OperationOutcome":
                outcome = body
        except ValueError:
            pass
        said = _outcome_text(outcome) if outcome else answer.text[:500].strip()
        return DeliveryError(f"{self.shown_url}: {what} answered {status} {answer.reason_phrase}"
                             + (f": {said}" if said else ""),
                             retryable=retryable_status(status), status=status, outcome=outcome,
                             retry_after=_retry_after(answer.headers.get("Retry-After")),
                             fields={"sent": list(sent)} if sent else None)


def fhir_sinks(settings: Any) -> list[FhirServerSink]:
    """One sink per ``fhir_url`` of the settings (all with the same credentials and TLS options)."""
    return [FhirServerSink(url, version=settings.fhir_version, token=settings.fhir_token,
                           token_file=settings.fhir_token_file, username=settings.fhir_username,
                           password=settings.fhir_password, ca_bundle=settings.fhir_ca_bundle,
                           timeout=settings.fhir_timeout, log_phi=settings.log_phi)
            for url in settings.fhir_url]


def _json(answer: httpx.Response) -> dict[str, Any]:
    body = orjson.loads(answer.content)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def _outcome_text(outcome: dict[str, Any]) -> str:
    """The issues of an OperationOutcome, one phrase each."""
    phrases = []
    for issue in outcome.get("issue", []) or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
        where = ",".join(issue.get("expression", []) or issue.get("location", []) or [])
        phrases.append(f"{issue.get('severity', '?')}: {text}" + (f" @ {where}" if where else ""))
    return "; ".join(phrases)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _response_entries(answer: httpx.Response, requests: Sequence[str]) -> list[dict[str, Any]]:
    """Status, resource (Type/id) and version of each transaction-response entry (request order)."""
    try:
        body = _json(answer)
    except ValueError:
        body = {}
    entries = body.get("entry") if body.get("resourceType") == "Bundle" else None
    if not isinstance(entries, list):
        log.warning("FHIR server answered the transaction with %s, not a transaction-response Bundle",
                    body.get("resourceType", "no JSON"))
        return []
    result = []
    for index, entry in enumerate(entries[:len(requests)]):
        response = (entry or {}).get("response") or {}
        location = response.get("location") or ""
        match = _LOCATION.search(location)
        etag = response.get("etag") or ""
        version = etag.removeprefix("W/").strip('"') or (match.group(3) if match else None)
        result.append({
            "status": response.get("status"),
            "resource": f"{match.group(1)}/{match.group(2)}" if match else None,
            "version": version or None,
            "location": location or None,
            "request": requests[index],
        })
    return result


def _bundle_problems(built: BuiltBundle, version: FhirVersion) -> list[str]:
    """Our own check of the entries the ImagingStudy validation did not cover (Patient, Endpoint)."""
    problems = []
    for entry in built.bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "ImagingStudy":
            continue  # validated by the publisher before it reached the sink
        model = _model(kind, version)
        if model is None:
            continue
        try:
            model.model_validate(resource)
        except (ValueError, TypeError) as exc:
            problems.append(f"{kind}: {exc}")
    return problems


def _model(kind: str, version: FhirVersion) -> Any:
    """The fhir.resources model of ``kind`` for R4 (R4B's) or R5; none for R6."""
    if version is FhirVersion.R4:
        from fhir.resources.R4B import get_fhir_model_class as r4b_model

        return r4b_model(kind)
    if version is FhirVersion.R5:
        from fhir.resources import get_fhir_model_class as r5_model

        return r5_model(kind)
    return None
