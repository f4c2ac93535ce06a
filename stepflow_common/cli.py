"""Command-line helpers: every flag also reads ``STEPFLOW_<COMMAND>_<FLAG>``."""

from __future__ import annotations

import argparse
import os

from stepflow_common.serving import Security


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
) -> None:
    """A flag whose default comes from its environment variable(s), then ``default``."""
    names = [env_name(command, flag), *extra_env]
    value: str | int | None = default
    for name in reversed(names):  # the first name wins
        if name in os.environ:
            value = os.environ[name]
    parser.add_argument(
        flag,
        default=type_(value) if value is not None else None,
        type=type_,
        help=f"{help_text} [env: {', '.join(names)}; default: {default}]",
    )


def add_server_flags(parser: argparse.ArgumentParser, command: str) -> None:
    add_flag(parser, command, "--log-format", "auto", "console | json | auto (console on a tty)")
    add_flag(parser, command, "--log-level", "info", "debug | info | warning | error")
    add_flag(parser, command, "--tls-cert", "", "PEM certificate to serve TLS with")
    add_flag(parser, command, "--tls-key", "", "PEM private key for --tls-cert")
    add_flag(parser, command, "--tls-ca", "", "PEM CA: require client certificates it signed")
    add_flag(parser, command, "--auth-token", "", "require 'authorization: Bearer TOKEN' on calls")


def security_from(args: argparse.Namespace) -> Security:
    return Security(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, auth_token=args.auth_token
    )
