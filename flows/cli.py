"""The ``tartflow`` command: a thin layer above the core and the ``pull-image`` flow.

It lives with the flows because ``pull`` runs one; ``list``, ``gc`` and ``copy`` call core
functions (``TartCache.list``, ``tartflow.gc.collect``, ``tartflow.copy.copy_image``) and run
without Prefect.

Exit codes: 0 done; 2 usage error (with the usage line); 130 interrupted (SIGINT/SIGTERM);
1 any other failure. Every error is one line on stderr; a traceback only with ``--verbose``
and only for what is not an expected failure. ``pull --json`` writes one JSON object per line
on stdout and nothing else (``tartflow.jsonout``), ending with one ``end`` object that carries
the exit code. An image already current in Tart's cache is answered without Prefect when no
Prefect server is configured (``flows.current``). Prefect is imported only when a flow runs
(``flows.run`` imports it inside ``run_pull``), so ``tartflow list`` and usage errors answer
at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from flows.current import answer_if_current, prefect_api_configured
from flows.run import run_pull
from tartflow import cancel
from tartflow.errors import InterruptedPull, TartflowError, UsageError
from tartflow.jsonout import JsonLines
from tartflow.peer.client import parse_peers
from tartflow.progress import LogReporter, Reporter, set_reporter
from tartflow.reference import parse_reference
from tartflow.registry.mirrors import parse_mirrors
from tartflow.tartcache import TartCache

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive_int(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 32:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 32, got {text!r}")
    return int(text)


def _duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m`` or ``2h``."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 30m or 2h, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration cannot be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tartflow", description="Pull Tart VM images as resumable, verified Prefect flows.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show Prefect's logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pull = sub.add_parser("pull", help="pull an image into Tart's cache ($TART_HOME/cache/OCIs)")
    pull.add_argument("reference", help="host[:port]/namespace[:tag|@sha256:<hex>]")
    pull.add_argument("--insecure", action="store_true", help="plain HTTP to the registry, as in Tart")
    pull.add_argument("--concurrency", type=_positive_int, default=4, metavar="N",
                      help="layer downloads in flight (default 4, as Tart)")
    pull.add_argument("--retry-for", type=_duration, default=1800.0, metavar="DURATION",
                      help="keep retrying temporary failures this long (default 30m)")
    pull.add_argument("--egress-limit", metavar="NAME", default=None,
                      help="hold a slot of this Prefect global concurrency limit while downloading (fleets)")
    pull.add_argument("--credentials-block", metavar="NAME", default=None,
                      help="registry credentials from this Prefect Secret block (fleets with a Prefect server)")
    pull.add_argument("--json", action="store_true",
                      help="one JSON object per line on stdout: start, progress, layer, end (schema in README)")
    pull.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    copy = sub.add_parser("copy", help="copy a Tart image between registries (seed a LAN registry for a fleet)")
    copy.add_argument("source", help="host[:port]/namespace[:tag|@sha256:<hex>]")
    copy.add_argument("destination", help="host[:port]/namespace[:tag]")
    copy.add_argument("--insecure", action="store_true", help="plain HTTP to both registries")
    copy.add_argument("--retry-for", type=_duration, default=1800.0, metavar="DURATION",
                      help="keep retrying temporary failures this long (default 30m)")
    serve = sub.add_parser("serve", help="serve this machine's cached VMs to peer runners (needs TARTFLOW_PEER_TOKEN)")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on, e.g. 0.0.0.0:8377")
    sub.add_parser("list", help="list the images in Tart's OCI cache, like `tart list --source oci`")
    gc = sub.add_parser("gc", help="remove partial downloads and staging VMs that abandoned pulls left")
    gc.add_argument("--older-than", type=_duration, default=24 * 3600.0, metavar="DURATION",
                    help="only what was last written longer ago than this (default 24h); 0 for everything unlocked")
    _add_prune(sub)  # issue 13
    return parser


def _add_prune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tartflow.prune import parse_duration, parse_size

    def typed(parse: Callable[[str], object]) -> Callable[[str], object]:
        def convert(text: str) -> object:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return convert

    prune = sub.add_parser("prune", help="remove images from Tart's OCI cache, as `tart prune --entries caches`")
    prune.add_argument("--older-than", type=typed(parse_duration), metavar="DURATION",
                       help="remove images last accessed longer ago than this (e.g. 7d, 12h)")
    prune.add_argument("--space-budget", type=typed(parse_size), metavar="SIZE",
                       help="keep the most recently accessed images that fit in this size (e.g. 100GB)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lines = JsonLines(sys.stdout) if "pull" in argv and "--json" in argv else None
    try:
        code, error, status = _main(argv, lines)
    except SystemExit as exc:  # argparse has printed the usage line and the error on stderr
        if lines is None or exc.code in (0, None):
            raise
        code, error, status = EXIT_USAGE, UsageError("invalid command line; see the usage line on stderr"), "usage-error"
    if lines is not None:
        lines.end(status, code, error)
    return code


def _main(argv: list[str], lines: JsonLines | None) -> tuple[int, BaseException | None, str]:
    """Run the command; returns the exit code, the error it ended with and a one-word status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _list(), None, "ok"
        if args.command == "gc":
            return _gc(args.older_than), None, "ok"
        if args.command == "prune":
            code = _prune(parser, args)
            return code, None, "ok" if code == EXIT_OK else "usage-error"
        if args.command == "serve":
            code = _serve(parser, args.listen)
            return code, None, "ok" if code == EXIT_OK else "usage-error"
        try:
            for ref in (args.source, args.destination) if args.command == "copy" else (args.reference,):
                parse_reference(ref)
            parse_mirrors(os.environ.get("TARTFLOW_MIRRORS"))
            parse_peers(os.environ.get("TARTFLOW_PEERS"))
        except UsageError as exc:
            print(parser.format_usage().rstrip(), file=sys.stderr)
            print(f"tartflow: error: {exc}", file=sys.stderr)
            return EXIT_USAGE, exc, "usage-error"
        if args.command == "copy":
            return _copy(args), None, "ok"
        return _pull(args, lines)
    except InterruptedPull as exc:
        print(f"tartflow: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED, exc, "interrupted"
    except TartflowError as exc:
        print(f"tartflow: error: {exc}", file=sys.stderr)
        return EXIT_FAILED, exc, "failed"


def _pull(args: argparse.Namespace, lines: JsonLines | None) -> tuple[int, BaseException | None, str]:
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    old = set_reporter(lines or LogReporter(interval=5.0, emit=_print_line))
    try:
        if not (prefect_api_configured() or args.credentials_block):
            found = answer_if_current(args.reference, insecure=args.insecure, retry_for=args.retry_for)
            if found is not None:
                print(f"{args.reference} is current in Tart's cache at {found.path} ({found.digest[:19]}); "
                      f"nothing to pull, access time refreshed ({time.monotonic() - started:.1f} s)",
                      file=sys.stderr)
                return EXIT_OK, None, "current"
        return _run_flow(args, lines, started)
    finally:
        set_reporter(old)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_flow(args: argparse.Namespace, lines: JsonLines | None, started: float) -> tuple[int, BaseException | None, str]:
    live = sys.stderr.isatty() and not args.verbose and lines is None
    from tartflow import render  # rich, only for a pull

    view: Reporter = lines or (render.LiveReporter(sys.stderr) if live else LogReporter(interval=5.0, emit=_print_line))
    old = set_reporter(view)
    try:
        with render.showing(view):
            path = run_pull(
                args.reference, insecure=args.insecure, concurrency=args.concurrency,
                retry_for=args.retry_for, verbose=args.verbose, egress_limit=args.egress_limit,
                credentials_block=args.credentials_block,
            )
    except TartflowError:
        raise
    except BaseException as exc:
        # Prefect answers SIGTERM with its own TerminationSignal (a BaseException) and then
        # hands the signal on to our handler: once a stop was requested, it is an interruption.
        if cancel.stop_requested():
            raise InterruptedPull(f"pull of {args.reference} interrupted; every byte received is kept: "
                                  "run the same command again to continue") from None
        if args.verbose or not isinstance(exc, Exception):
            raise
        print(f"tartflow: error: {type(exc).__name__}: {exc} (run with --verbose for details)", file=sys.stderr)
        return EXIT_FAILED, exc, "failed"
    finally:
        set_reporter(old)
    print(f"pulled {args.reference} into {path} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return EXIT_OK, None, "pulled"


def _copy(args: argparse.Namespace) -> int:
    from tartflow.context import PullContext, PullSettings
    from tartflow.copy import copy_image

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    old = set_reporter(LogReporter(interval=5.0, emit=_print_line))
    try:
        settings = PullSettings.from_env(insecure=args.insecure, retry_for=args.retry_for)
        report = copy_image(PullContext.build(settings), args.source, args.destination)
    finally:
        set_reporter(old)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"copied {args.source} to {args.destination} ({report.digest}): {report.copied / 1e6:.1f} MB sent, "
          f"{len(report.skipped)} blobs already there", file=sys.stderr)
    return EXIT_OK


def _serve(parser: argparse.ArgumentParser, listen: str) -> int:
    from tartflow.peer import server
    try:
        server.parse_listen(listen)
    except UsageError as exc:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        print(f"tartflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    server.serve(listen)
    return EXIT_OK


def _print_line(text: str) -> None:
    print(f"tartflow: {text}", file=sys.stderr, flush=True)


def _on_signal(signum: int, frame: object) -> None:
    if cancel.stop_requested():  # a second Ctrl+C: leave now; partials are safe on disk
        os._exit(EXIT_INTERRUPTED)
    cancel.request_stop()


def _list() -> int:
    images = TartCache().list()
    print(f"{'NAME':<60} {'DIGEST':<20} {'DISK':>8} {'SIZE':>8}  ACCESSED")
    for image in images:
        print(f"{image.name:<60} {image.digest[:19]:<20} {image.disk_size / 1e9:>6.1f}GB "
              f"{image.size_on_disk / 1e9:>6.1f}GB  {_ago(image.accessed)}")
    return EXIT_OK


def _gc(older_than: float) -> int:
    from tartflow.context import PullContext, PullSettings
    from tartflow.gc import collect

    report = collect(PullContext.build(PullSettings()).store, older_than)
    for label in report.removed:
        print(f"removed {label}")
    for label in report.kept_locked:
        print(f"kept {label}: a pull is using it")
    print(f"freed {report.freed / 1e6:.1f} MB")
    return EXIT_OK


def _prune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from tartflow.prune import prune_cache

    if args.older_than is None and args.space_budget is None:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        print("tartflow: error: prune needs --older-than, --space-budget or both", file=sys.stderr)
        return EXIT_USAGE
    report = prune_cache(TartCache(), older_than=args.older_than, space_budget=args.space_budget,
                         dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for entry in report.removed:
        print(f"{verb} {entry.label} ({entry.size / 1e9:.2f} GB, accessed {_ago(entry.accessed)})")
    for entry in report.busy:
        print(f"kept {entry.label}: a tart pull holds the lock on {entry.host}; run prune again later")
    print(f"{verb} {len(report.removed)} image(s), {report.freed / 1e9:.2f} GB")
    return EXIT_OK


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


if __name__ == "__main__":
    sys.exit(main())
