"""The ``imagingstudy-scp`` command line: serve, reindex, config.

Flags left out do not override anything: only the flags given on the command line reach the settings,
so the environment and the config file fill in the rest (see :mod:`scp.settings`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from scp import logs
from scp.settings import Settings, SettingsError, load_settings

log = logging.getLogger("scp")


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
    run: Callable[[Settings], int] = args.run
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
    serve.add_argument("--fhir-version", help="FHIR release of the ImagingStudy: R6 (default), R5 or R4")
    serve.add_argument("--wado-rs-url", help="DICOMweb WADO-RS base URL for ImagingStudy.endpoint")
    serve.add_argument("--timezone", help="IANA zone for DICOM times without an offset (default: the host's)")
    serve.add_argument("--max-pdu", type=int, dest="max_pdu_size",
                       help="largest PDU we accept (default 131072, 0 = unlimited)")
    serve.add_argument("--no-fsync", action="store_const", const=False, dest="fsync",
                       help="do not fsync (faster, NOT durable on power loss; for throwaway data)")
    serve.add_argument("--min-free-disk-mb", type=int, help="below this free space C-STORE answers 0xA700 "
                       "(default 100)")
    serve.add_argument("--duplicate-policy", choices=["replace", "keep-first", "reject"],
                       help="an instance already stored: replace (default, latest wins), keep-first or reject")
    serve.add_argument("--http-port", type=int, help="admin HTTP port for /healthz, /readyz, /metrics (off unless set)")
    serve.add_argument("--http-host", help="admin HTTP address (default 127.0.0.1)")
    serve.add_argument("--log-phi", action="store_const", const=True,
                       help="allow patient-identifying values in logs")
    serve.set_defaults(run=_serve)

    reindex = sub.add_parser("reindex", help="rebuild the index from the stored files")
    _common(reindex)
    reindex.set_defaults(run=_reindex)

    config = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    _common(config)
    config.set_defaults(run=_config)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (default: ./imagingstudy-scp.toml if present)")
    parser.add_argument("--data-dir", type=Path, help="where studies, the index and resources live (default ./scp-data)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    parser.add_argument("--log-format", choices=["text", "json"], help="text (default) or JSON lines")


def _serve(settings: Settings) -> int:
    from scp.server import Server

    server = Server(settings)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    log.info("imagingstudy-scp serving %s on %s:%d, ImagingStudy %s, data in %s", settings.aet, settings.host,
             server.port, settings.fhir_version, settings.data_dir)
    server.wait()
    return 0


def _reindex(settings: Settings) -> int:
    from scp.index import INDEX_FILE, Index
    from scp.reconcile import reindex
    from scp.store import Store

    store = Store(settings.data_dir, fsync=settings.fsync)
    index = Index(store.data_dir / INDEX_FILE)
    try:
        count = reindex(store, index)
    finally:
        index.close()
    log.info("reindexed %d instances in %s", count, store.data_dir)
    print(count)
    return 0


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
    return orjson.dumps(str(value)).decode()  # a JSON string is a valid TOML basic string


if __name__ == "__main__":
    sys.exit(main())
