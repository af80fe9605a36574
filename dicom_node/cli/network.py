"""``dicom-node echo`` and ``dicom-node send``: the node's own DICOM SCU from the command line.

``echo`` tests a destination (is it up, does it accept our AE title); ``send`` stores DICOM files
on a peer: a study to the node itself (tests, the demo), or results to a PACS by hand. Only UIDs,
AE titles, hosts and counts are printed, never patient data.
"""

from __future__ import annotations

import logging
import ssl
import sys
import time
from pathlib import Path

import typer
from tqdm import tqdm

from dicom_node.cli.exits import EXIT_FAILED, EXIT_USAGE, fail
from dicom_node.config import ConfigError, load_config
from dicom_node.paths import DEFAULT_CONFIG
from dicom_node.scu import (
    Peer,
    SendError,
    client_ssl_context,
    iter_dicom_files,
    send_files,
)
from dicom_node.scu import echo as scu_echo

_CONFIG_HELP = (
    "Config file whose node.ae_title is the default calling AE title "
    "(default: config/node.yaml, i.e. ILD_NODE)."
)


def _calling_aet(calling_aet: str | None, config: Path) -> str:
    if calling_aet is not None:
        return calling_aet
    try:
        return load_config(config).node.ae_title
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def _logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    else:
        # The one-line error below says it all: with no logging configured, keep Python's last-resort
        # handler from printing the library's warnings too (a configured root handler still gets them).
        logger = logging.getLogger("dicom_node.scu")
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())


def _ssl_context(tls: bool, ca_file: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if not tls:
        if ca_file or cert or key:
            raise fail("--ca-file, --cert and --key need --tls", EXIT_USAGE)
        return None
    if key is not None and cert is None:
        raise fail("--key needs --cert", EXIT_USAGE)
    try:
        return client_ssl_context(ca_file, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"cannot load the TLS files: {exc}", EXIT_USAGE) from None


CallingOption = typer.Option(
    None, "--calling-aet", "-a", help="Our (calling) AE title. Default: node.ae_title of --config.", show_default=False
)
ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help=_CONFIG_HELP, show_default="config/node.yaml")
TimeoutOption = typer.Option(
    30.0, "--timeout", "-t", min=0.1, help="Seconds to wait for the connection, the association and each response."
)
TlsOption = typer.Option(False, "--tls", help="Use DICOM TLS (the peer's certificate is verified).")
CaOption = typer.Option(None, "--ca-file", help="PEM CA bundle to verify the peer (default: the system CAs).")
CertOption = typer.Option(None, "--cert", help="PEM client certificate, for peers that require one.")
KeyOption = typer.Option(None, "--key", help="PEM private key of --cert (if not inside --cert).")
PathsArgument = typer.Argument(
    ..., exists=True, help="DICOM files or folders (searched recursively; files without the DICM preamble are skipped)."
)
VerboseOption = typer.Option(False, "--verbose", "-v", help="Log the association details on stderr.")


def echo(
    host: str = typer.Argument(..., help="Host name or IP address of the peer."),
    port: int = typer.Argument(..., min=1, max=65535, help="The peer's DICOM port."),
    ae_title: str = typer.Argument(..., help="The peer's (called) AE title."),
    calling_aet: str = CallingOption,
    config: Path = ConfigOption,
    timeout: float = TimeoutOption,
    tls: bool = TlsOption,
    ca_file: Path = CaOption,
    cert: Path = CertOption,
    key: Path = KeyOption,
    verbose: bool = VerboseOption,
) -> None:
    """Test a DICOM destination with a C-ECHO (verification): is it up, does it accept our AE title?

    Prints "C-ECHO AET@host:port: OK in X ms" (the C-ECHO round trip, then with association and release).

    Exit codes: 0 OK; 1 no answer, refused or rejected (one line on stderr says why); 2 bad usage.

    Example: dicom-node echo 127.0.0.1 4242 ORTHANC
    """
    _logging(verbose)
    try:
        peer = Peer(ae_title=ae_title, host=host, port=port, tls=tls)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    calling = _calling_aet(calling_aet, config)
    context = _ssl_context(tls, ca_file, cert, key)
    start = time.monotonic()
    try:
        rtt = scu_echo(peer, calling_ae=calling, timeout=timeout, ssl_context=context)
    except ValueError as exc:  # an invalid --calling-aet
        raise fail(str(exc), EXIT_USAGE) from None
    except SendError as exc:
        raise fail(exc.reason, EXIT_FAILED) from None
    total = time.monotonic() - start
    typer.echo(f"C-ECHO {peer}: OK in {rtt * 1e3:.1f} ms (with association and release: {total * 1e3:.0f} ms)")


def send(
    paths: list[Path] = PathsArgument,
    to: str = typer.Option(..., "--to", help="Destination as HOST:PORT:AET, e.g. 127.0.0.1:11112:ILD_NODE."),
    calling_aet: str = CallingOption,
    config: Path = ConfigOption,
    timeout: float = TimeoutOption,
    tls: bool = TlsOption,
    ca_file: Path = CaOption,
    cert: Path = CertOption,
    key: Path = KeyOption,
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (none either when stderr is not a terminal)."),
    verbose: bool = VerboseOption,
) -> None:
    """Send DICOM files to a peer with C-STORE, as stored (never re-compressed), over one association.

    For sending a study to the node (tests, the demo, a PACS stand-in) or results to a PACS by hand.

    Prints "sent N of M instance(s) to AET@host:port in X s (Y instances/s)", then each failure (UID, status).

    Exit codes: 0 all stored; 1 any failure, or no DICOM files found; 2 bad usage (e.g. a malformed --to).

    Example: dicom-node send study/ --to 127.0.0.1:11112:ILD_NODE
    """
    _logging(verbose)
    try:
        peer = Peer.parse(to, tls=tls)
    except ValueError as exc:
        raise fail(f"--to: {exc}", EXIT_USAGE) from None
    calling = _calling_aet(calling_aet, config)
    context = _ssl_context(tls, ca_file, cert, key)
    files: list[Path] = []
    skipped = 0
    for path in paths:
        found = iter_dicom_files(path)
        files.extend(found)
        skipped += found.skipped
    if not files:
        raise fail(f"no DICOM files found in {', '.join(map(str, paths))}" + (f" ({skipped} other file(s))" if skipped else ""))
    if skipped:
        typer.echo(f"skipped {skipped} file(s) that are not DICOM", err=True)

    bar = tqdm(total=len(files), unit="inst", file=sys.stderr, disable=no_progress or not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        report = send_files(files, peer, calling_ae=calling, timeout=timeout, ssl_context=context, progress=progress)
    except ValueError as exc:  # an invalid --calling-aet
        raise fail(str(exc), EXIT_USAGE) from None
    except SendError as exc:
        bar.close()
        raise fail(exc.reason, EXIT_FAILED) from None
    bar.close()
    rate = report.sent / report.seconds if report.seconds > 0 else 0.0
    typer.echo(
        f"sent {report.sent} of {len(files)} instance(s) to {peer} in {report.seconds:.2f} s ({rate:.1f} instances/s)"
    )
    for f in report.files:
        if f.ok and f.warning:
            typer.echo(f"  warning: {f.sop_instance_uid} status {f.status_text}")
    for f in report.failed:
        typer.echo(f"  failed: {f.sop_instance_uid or f.path.name} {f.status_text}")
    if report.failed:
        raise fail(f"{len(report.failed)} of {len(files)} instance(s) not stored")
