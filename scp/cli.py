"""The ``imagingstudy-scp`` command line: serve, reindex."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from scp.fhir_version import FhirVersion
from scp.settings import Settings, SettingsError

log = logging.getLogger("scp")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = _settings(args)
    except SettingsError as exc:
        parser.error(str(exc))
    _configure_logging(settings.log_level)
    return int(args.run(settings) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagingstudy-scp",
        description="DICOM Storage SCP that publishes a FHIR ImagingStudy per study on association release.",
    )
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="receive studies and publish ImagingStudy resources")
    _common(serve)
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    serve.add_argument("--aet", default="IMAGINGSTUDY", help="our AE title (default IMAGINGSTUDY)")
    serve.add_argument("--fhir-version", default="R6", type=FhirVersion.parse,
                       help="FHIR release of the ImagingStudy: R6 (default), R5 or R4")
    serve.add_argument("--wado-rs-url", default=None, help="DICOMweb WADO-RS base URL for ImagingStudy.endpoint")
    serve.add_argument("--timezone", default=None,
                       help="IANA zone for DICOM times without an offset (default: the host's zone)")
    serve.add_argument("--max-pdu", type=int, default=131072, dest="max_pdu_size",
                       help="maximum PDU size we receive (default 131072, 0 = unlimited)")
    serve.add_argument("--no-fsync", action="store_false", dest="fsync",
                       help="do not fsync files (faster, NOT durable on power loss; for tests and benchmarks)")
    serve.add_argument("--log-phi", action="store_true", help="allow patient-identifying values in logs")
    serve.set_defaults(run=_serve)

    reindex = sub.add_parser("reindex", help="rebuild the index from the stored files")
    _common(reindex)
    reindex.set_defaults(run=_reindex)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("scp-data"),
                        help="where studies, the index and ImagingStudy files live (default ./scp-data)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _settings(args: argparse.Namespace) -> Settings:
    known = set(Settings.__dataclass_fields__)
    return Settings(**{k: v for k, v in vars(args).items() if k in known})


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(settings: Settings) -> int:
    from scp.server import Server

    server = Server(settings)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    log.info("imagingstudy-scp %s serving %s on %s:%d, data in %s", settings.fhir_version, settings.aet,
             settings.host, server.port, settings.data_dir)
    server.wait()
    return 0


def _reindex(settings: Settings) -> int:
    from scp.reconcile import reindex
    from scp.server import data_dir_index
    from scp.store import Store

    store = Store(settings.data_dir, fsync=settings.fsync)
    index = data_dir_index(store.data_dir)
    try:
        count = reindex(store, index)
    finally:
        index.close()
    log.info("reindexed %d instances in %s", count, store.data_dir)
    print(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
