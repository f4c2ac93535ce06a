"""Command-line helpers both services share: flags that also read ``STEPFLOW_<COMMAND>_<FLAG>``,
one exit-status table, and one way of ending with an error: a single line on stderr that names
the thing and what to do (the traceback only with ``--log-level debug``)."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import traceback
from collections.abc import Callable

import grpc
import structlog
from grpc import aio

from stepflow_common import logs
from stepflow_common.channels import ChannelConfigError, check_tls_files
from stepflow_common.rpc_errors import REASON_KEY
from stepflow_common.serving import Security

EXIT_OK = 0
EXIT_FAILED = 1
"""The service refused or failed the request (no such job, a terminal job, an internal error)."""
EXIT_USAGE = 2
"""Bad flags or input: an unreadable or invalid job file, a bad duration or database URL.
argparse exits with 2 too, and a job the server finds invalid is the same mistake."""
EXIT_JOB_NOT_COMPLETED = 3
"""``submit --follow``: the job ended failed or cancelled."""
EXIT_UNREACHABLE = 4
"""Something needed cannot be reached or used: a service's address, the database, the address
to listen on."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), as a shell reports it."""

EXIT_CODES_HELP = f"""exit status:
  {EXIT_OK:<4} success (a server: stopped by SIGTERM or Ctrl-C)
  {EXIT_FAILED:<4} the service refused or failed the request (e.g. no such job)
  {EXIT_USAGE:<4} bad flags or input (a job file, a duration, a database URL)
  {EXIT_JOB_NOT_COMPLETED:<4} submit --follow: the job ended failed or cancelled
  {EXIT_UNREACHABLE:<4} cannot reach or use a service, the database, or the listen address
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C) before the command finished"""


class CliError(Exception):
    """Ends a command with ``message`` as its one line on stderr and ``code`` as its status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.HelpFormatter):
    """Wraps paragraphs as usual but keeps indented blocks (the exit-status table) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(super()._fill_text(block, width, indent))
        return "\n\n".join(out)


def env_name(command: str, flag: str) -> str:
    return f"STEPFLOW_{command.upper()}_{flag.lstrip('-').replace('-', '_').upper()}"


def add_flag(
    parser: argparse.ArgumentParser,
    command: str,
    flag: str,
    default: str | int | None,
    help_text: str,
    *,
    extra_env: tuple[str, ...] = (),
    type_: type = str,
    env: bool = True,
    shown_default: str | None = None,
) -> None:
    """A flag whose default comes from its environment variable(s), then ``default``.

    ``env=False`` for a flag that must not outlive one invocation (an idempotency key read
    from a stale variable would make every call the same one). ``shown_default`` is what
    ``--help`` says when the default itself would read badly (empty, or computed later).
    """
    names = [env_name(command, flag), *extra_env] if env else []
    value: str | int | None = default
    for name in reversed(names):  # the first name wins
        if name in os.environ:
            value = os.environ[name]
    if shown_default is None:
        shown_default = "none" if default in ("", None) else str(default)
    where = f"env: {', '.join(names)}; " if names else ""
    parser.add_argument(
        flag,
        default=type_(value) if value is not None else None,
        type=type_,
        help=f"{help_text} [{where}default: {shown_default}]",
    )


def add_log_level(parser: argparse.ArgumentParser, command: str, default: str = "info") -> None:
    add_flag(
        parser,
        command,
        "--log-level",
        default,
        "debug | info | warning | error (debug also prints the traceback of an error)",
    )


def add_server_flags(parser: argparse.ArgumentParser, command: str) -> None:
    add_flag(parser, command, "--log-format", "auto", "console | json | auto (console on a tty)")
    add_log_level(parser, command)
    add_flag(parser, command, "--tls-cert", "", "PEM certificate to serve TLS with")
    add_flag(parser, command, "--tls-key", "", "PEM private key for --tls-cert")
    add_flag(parser, command, "--tls-ca", "", "PEM CA: require client certificates it signed")
    add_flag(parser, command, "--auth-token", "", "require 'authorization: Bearer TOKEN' on calls")
    add_flag(
        parser,
        command,
        "--otlp-endpoint",
        "",
        "send OpenTelemetry traces to the OTLP/gRPC collector at HOST:PORT (e.g. "
        "127.0.0.1:4317; https://HOST:PORT for TLS)",
        extra_env=("STEPFLOW_OTLP_ENDPOINT",),
        shown_default="none (tracing off)",
    )


def security_from(args: argparse.Namespace) -> Security:
    return Security(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, auth_token=args.auth_token
    )


def add_client_tls_flags(parser: argparse.ArgumentParser, command: str, services: str) -> None:
    """--tls-ca, --tls-cert and --tls-key of a command that calls ``services``."""
    add_flag(parser, command, "--tls-ca", "", f"PEM CA to verify {services}' TLS certificate")
    add_flag(
        parser,
        command,
        "--tls-cert",
        "",
        f"PEM client certificate for mutual TLS with {services} (with --tls-key)",
    )
    add_flag(parser, command, "--tls-key", "", "PEM private key for --tls-cert")


def check_tls(ca: str, cert: str, key: str, flags: tuple[str, str, str]) -> None:
    """CliError (bad input) unless the TLS files named by ``flags`` can work: a certificate
    comes with its key, and each file exists."""
    try:
        check_tls_files(ca, cert, key, names=flags)
    except ChannelConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def check_listen(host: str, port: int, flag: str = "--port") -> None:
    """CliError unless ``host:port`` can be listened on now.

    Checked before the server binds, so the person reads which address is taken instead of
    gRPC's own log line; the server's bind still reports a port taken in between.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(
            f"cannot listen on {host}:{port}: {exc.strerror}; check --host", EXIT_UNREACHABLE
        ) from exc
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise CliError(
                    f"cannot listen on {host}:{port}: {exc.strerror}; stop whatever uses it or "
                    f"choose another {flag} (or --host)",
                    EXIT_UNREACHABLE,
                ) from exc


def rpc_error(exc: aio.AioRpcError, service: str, address: str, flag: str) -> CliError:
    """A failed call as one line naming the service and its address, with what to do."""
    code, details = exc.code(), (exc.details() or "").strip()
    answered = any(key == REASON_KEY for key, _ in (exc.trailing_metadata() or ()))
    if code == grpc.StatusCode.UNAVAILABLE and answered:
        # The service answered: it is up but cannot serve (say, an orchestrator whose monitor
        # is away): its own words name what is missing.
        return CliError(f"the {service} at {address} is unavailable: {details}", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(
            f"cannot reach the {service} at {address} ({details or 'unavailable'}); is it "
            f"running there? Point {flag} at it",
            EXIT_UNREACHABLE,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the {service} at {address} did not answer in time", EXIT_UNREACHABLE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(
            f"the {service} at {address} refused the call: {details}; pass its token with "
            "--auth-token",
            EXIT_USAGE,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(details, EXIT_USAGE)
    return CliError(f"{code.name}: {details}", EXIT_FAILED)


def run(prog: str, body: Callable[[], int], *, debug: bool, log_as: str = "") -> int:
    """Run a command's body; any error ends it with one line on stderr and its exit status.

    An error nobody foresaw is still one line, naming its type, unless ``debug`` asks for the
    traceback. A server (``log_as`` names it) whose log is JSON reports the error as one more
    JSON event, so its log stays parseable to the end.
    """
    try:
        return body()
    except CliError as exc:
        if debug:
            traceback.print_exc()
        return _report(prog, str(exc), exc.code, log_as)
    except KeyboardInterrupt:
        return _report(prog, "interrupted", EXIT_INTERRUPTED, log_as)
    except Exception as exc:
        if debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (--log-level debug shows the traceback)"
        return _report(prog, f"{type(exc).__name__}: {exc}{hint}", EXIT_FAILED, log_as)
    finally:
        # The command is over and the process exits next. Without this, the exit's garbage
        # collection walks every object of the loaded modules (gRPC, SQLAlchemy, ...): about
        # half a second after a server stopped, which every restart and every test waits for.
        gc.freeze()


def _report(prog: str, message: str, code: int, log_as: str) -> int:
    if log_as and logs.current_format() == "json":
        structlog.get_logger(prog).error(f"{log_as} stopped", error=message, exit_status=code)
    else:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return code
