"""The ``imagingstudy-scp`` command line: serve, reindex, config.

Flags left out do not override anything: only the flags given on the command line reach the settings,
so the environment and the config file fill in the rest (see :mod:`scp.settings`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from scp import logs
from scp.settings import Settings, SettingsError, load_settings

log = logging.getLogger("scp")

_STOP_POLL = 0.2  # seconds between the main thread's looks at whether a signal asked it to stop


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    flags = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    try:
        settings = load_settings(flags, args.config)
    except SettingsError as exc:
        print(f"imagingstudy-scp: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    run: Callable[..., int] = args.run
    if "study_uid" in vars(args):
        return int(run(settings, args.study_uid) or 0)
    return int(run(settings) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagingstudy-scp",
        description="DICOM Storage SCP that publishes a FHIR ImagingStudy per study when an association ends.",
    )
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="receive studies and publish ImagingStudy resources")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="DICOM port (default 11112; 0 = any free port)")
    serve.add_argument("--aet", help="our AE title (default IMAGINGSTUDY)")
    serve.add_argument("--fhir-version", help="FHIR release of the ImagingStudy: R6, R5 or R4 (default: R6 for "
                       "the directory, a FHIR server's own release for that server)")
    serve.add_argument("--wado-rs-url", help="DICOMweb WADO-RS base URL for ImagingStudy.endpoint")
    serve.add_argument("--fhir-url", action="append", metavar="BASE",
                       help="FHIR server base URL to publish to (repeatable; the directory is always written)")
    serve.add_argument("--fhir-token", help="bearer token for the FHIR servers (better: env or --fhir-token-file)")
    serve.add_argument("--fhir-token-file", type=Path, help="file whose first line is the bearer token")
    serve.add_argument("--fhir-username", help="HTTP basic user for the FHIR servers")
    serve.add_argument("--fhir-password", help="HTTP basic password (better: env IMAGINGSTUDY_SCP_FHIR_PASSWORD)")
    serve.add_argument("--fhir-ca-bundle", type=Path, help="CA bundle (PEM) to verify FHIR server certificates")
    serve.add_argument("--fhir-timeout", type=float, help="seconds for one FHIR request (default 30)")
    serve.add_argument("--patient-id-system", help="identifier system of the Patient of a study without Patient ID "
                       "(default urn:imagingstudy-scp:unidentified-patient)")
    serve.add_argument("--outbox-initial-delay", type=float, help="seconds before the first retry (default 1)")
    serve.add_argument("--outbox-max-delay", type=float, help="cap of the retry delay in seconds (default 300)")
    serve.add_argument("--timezone", help="IANA zone for DICOM times without an offset (default: the host's)")
    serve.add_argument("--max-pdu", type=int, dest="max_pdu_size",
                       help="largest PDU we accept (default 131072, 0 = unlimited)")
    serve.add_argument("--no-fsync", action="store_const", const=False, dest="fsync",
                       help="do not fsync (faster, NOT durable on power loss; for throwaway data)")
    serve.add_argument("--accept-any-called-aet", action="store_const", const=True,
                       help="accept associations whatever AE title they call (default: ours only)")
    serve.add_argument("--max-associations", type=int, help="concurrent associations (default 32)")
    serve.add_argument("--acse-timeout", type=float, help="seconds (default 30)")
    serve.add_argument("--dimse-timeout", type=float, help="seconds (default 60)")
    serve.add_argument("--network-timeout", type=float,
                       help="seconds without network activity before closing (default 60)")
    serve.add_argument("--stop-grace", type=float, help="on stop: seconds open associations get to end before "
                       "they are aborted (default 5)")
    serve.add_argument("--workers", type=int, help="processes receiving associations (default 1; more use more "
                       "CPU cores for parallel associations)")
    serve.add_argument("--stock-transport", action="store_const", const=False, dest="event_driven_transport",
                       help="use pynetdicom's polling transport unchanged (for comparisons)")
    serve.add_argument("--max-instance-size-mb", type=int, help="refuse larger instances with 0xA700 (0 = no limit)")
    serve.add_argument("--tls-port", type=int, help="DICOM TLS port, beside the plain one (conventionally 2762)")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    serve.add_argument("--tls-ca", type=Path, help="CA bundle for client certificates")
    serve.add_argument("--tls-require-client-cert", action="store_const", const=True,
                       help="refuse TLS clients without a trusted certificate")
    serve.add_argument("--min-free-disk-mb", type=int, help="below this free space C-STORE answers 0xA700 "
                       "(default 100)")
    serve.add_argument("--duplicate-policy", choices=["replace", "keep-first", "reject"],
                       help="an instance already stored: replace (default, latest wins), keep-first or reject")
    serve.add_argument("--http-port", type=int, help="admin HTTP port for /healthz, /readyz, /metrics (off unless set)")
    serve.add_argument("--http-host", help="admin HTTP address (default 127.0.0.1)")
    serve.add_argument("--log-phi", action="store_const", const=True,
                       help="allow patient-identifying values in logs")
    serve.set_defaults(run=_serve)

    for name, help_text, run, takes_study in (
        ("reindex", "rebuild the index from the stored files", _reindex, False),
        ("studies", "list the studies in the data dir", _studies, False),
        ("show", "print a study's ImagingStudy as it would be published", _show, True),
        ("publish", "publish a study again, now", _publish, True),
        ("config", "print the effective configuration (secrets masked)", _config, False),
    ):
        command = sub.add_parser(name, help=help_text)
        _common(command)
        if takes_study:
            command.add_argument("study_uid", metavar="STUDY_UID")
            command.add_argument("--fhir-version", help="R6 (default), R5 or R4")
        command.set_defaults(run=run)

    outbox = sub.add_parser("outbox", help="list the publications pending or dead in the outbox")
    _common(outbox)
    outbox.set_defaults(run=_outbox_list)
    outbox_sub = outbox.add_subparsers(dest="outbox_command")
    retry = outbox_sub.add_parser("retry", help="re-queue dead (and hurry pending) publications, all or one study's")
    retry.add_argument("study_uid", metavar="STUDY_UID", nargs="?")
    retry.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="the data dir (default ./scp-data)")
    retry.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config file")
    retry.set_defaults(run=_outbox_retry)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (default: ./imagingstudy-scp.toml if present)")
    parser.add_argument("--data-dir", type=Path, help="where studies, the index and resources live (default ./scp-data)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    parser.add_argument("--log-format", choices=["text", "json"], help="text (default) or JSON lines")


def _serve(settings: Settings) -> int:
    from scp.reconcile import StoreLooksEmpty
    from scp.server import Server
    from scp.store import DataDirInUse
    from scp.workers import ReceiverFailed

    server = Server(settings)
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        # Only a note, no lock, no stopping here: the handler runs on the main thread wherever it is, e.g. inside
        # the index's lock during start-up reconciliation, where stopping (which closes the index) would wait for
        # ever, or inside an Event's own lock (Event.set would too).
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
    except ReceiverFailed as exc:
        if stop_requested:  # systemd signals every process: a receiver still starting ended as asked
            log.info("signal %d: stopped while starting", stop_requested[0])
            return 0
        print(f"imagingstudy-scp: {exc}", file=sys.stderr)
        return 1
    except (DataDirInUse, StoreLooksEmpty) as exc:
        print(f"imagingstudy-scp: {exc}", file=sys.stderr)
        return 1
    if not stop_requested:
        log.info("imagingstudy-scp serving %s on %s:%d, ImagingStudy %s, data in %s", settings.aet, settings.host,
                 server.port, settings.fhir_version or "R6 (FHIR servers: their own)", settings.data_dir)
    while not stop_requested:
        time.sleep(_STOP_POLL)
    log.info("signal %d: stopping", stop_requested[0])
    server.stop()
    return 0


def _reindex(settings: Settings) -> int:
    from scp.index import INDEX_FILE, Index
    from scp.reconcile import reindex
    from scp.store import DataDirInUse, DataDirLock, Store

    store = Store(settings.data_dir, fsync=settings.fsync)
    lock = DataDirLock(store.data_dir)
    try:
        lock.acquire()  # not under a running server: its C-STOREs would wait on the index for the whole reindex
    except DataDirInUse as exc:
        print(f"imagingstudy-scp: {exc}", file=sys.stderr)
        return 1
    index = Index(store.data_dir / INDEX_FILE)
    try:
        count = reindex(store, index)
    finally:
        index.close()
        lock.release()
    log.info("reindexed %d instances in %s", count, store.data_dir)
    print(count)
    return 0


def _studies(settings: Settings) -> int:
    """A table of the studies in the index (readable while the server runs: SQLite WAL)."""
    import datetime as dt

    from scp.index import INDEX_FILE, Index

    index = Index(Path(settings.data_dir) / INDEX_FILE)
    try:
        rows = index.studies()
    finally:
        index.close()
    header = ("STUDY INSTANCE UID", "PATIENT ID", "MODALITIES", "SERIES/INSTANCES", "LAST RECEIVED", "PUBLICATION")
    table = [header] + [(
        s.study_uid, s.patient_id or "-", "/".join(s.modalities) or "-", f"{s.series}/{s.instances}",
        dt.datetime.fromtimestamp(s.last_received_at).astimezone().isoformat(timespec="seconds"),
        s.publication_state) for s in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _show(settings: Settings, study_uid: str) -> int:
    """Print the ImagingStudy the server would publish for the study, with any problems on stderr."""
    from scp.index import INDEX_FILE, Index
    from scp.mapping.imaging_study import build_imaging_study
    from scp.server import mapping_options
    from scp.validation import imaging_study_problems

    index = Index(Path(settings.data_dir) / INDEX_FILE)
    try:
        instances = index.study_instances(study_uid)
    finally:
        index.close()
    if not instances:
        print(f"imagingstudy-scp: no study {study_uid} in {settings.data_dir}", file=sys.stderr)
        return 1
    mapped = build_imaging_study([i.header for i in instances], mapping_options(settings))
    for warning in mapped.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for problem in imaging_study_problems(mapped.resource, settings.directory_fhir_version()):
        print(f"invalid: {problem}", file=sys.stderr)
    sys.stdout.write(orjson.dumps(mapped.resource, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _publish(settings: Settings, study_uid: str) -> int:
    """Assemble, validate and deliver one study now, to every configured sink."""
    from scp.index import INDEX_FILE, Index
    from scp.server import publisher_for

    index = Index(Path(settings.data_dir) / INDEX_FILE)
    try:
        publisher = publisher_for(settings, index)
        try:
            outcome = publisher.publish_now(study_uid)
        finally:
            publisher.close()
    finally:
        index.close()
    if not outcome.published:
        print(f"imagingstudy-scp: study {study_uid} was not published"
              + (": " + "; ".join(outcome.problems) if outcome.problems else ""), file=sys.stderr)
        return 1
    done = "withdrew {} from {}" if outcome.withdrawn else "published {} to {}"  # withdrawn: no instances left
    print(done.format(study_uid, ", ".join(outcome.sinks)))
    return 0


def _outbox_list(settings: Settings) -> int:
    """A table of the pending and dead publications (readable while the server runs: SQLite WAL)."""
    from scp.outbox import print_outbox

    return print_outbox(Path(settings.data_dir))


def _outbox_retry(settings: Settings, study_uid: str | None) -> int:
    """Re-queue dead publications (all, or one study's); a running server delivers them within a second."""
    from scp.outbox import retry_outbox

    return retry_outbox(Path(settings.data_dir), study_uid)


def _config(settings: Settings) -> int:
    """Print the effective settings as TOML, ready to be used as a config file."""
    for key, value in settings.effective().items():
        if value is None:
            print(f"# {key} =  (not set)")
        else:
            print(f"{key} = {_toml(value)}")
    return 0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return orjson.dumps(str(value)).decode()  # a JSON string is a valid TOML basic string


if __name__ == "__main__":
    sys.exit(main())
