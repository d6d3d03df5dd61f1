"""How every ``molo`` command answers a user error: one line on stderr, ``molo <command>: what,
where, what is allowed``, and exit code 2; never a traceback.

Where it sits: the command line's edge. :class:`Parser` makes argparse's own errors one line (no
usage block); the ``positive``/``port`` types say what a number flag accepts; :func:`explain` turns
the errors a command meets at its start (bad ``MOLO_*`` settings, a database it cannot reach, a
folder it cannot write) into that one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit


class UserError(Exception):
    """A mistake in what the user asked for; its message is the whole line after ``molo <command>:``."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``molo demo: argument --speed: ... (molo demo --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number above 0."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0 (given {text})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _whole(text: str, lo: int, hi: int | None, what: str, allowed: str) -> int:
    """``text`` as a whole number from ``lo`` to ``hi`` (no upper bound if None), or argparse's error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < lo or (hi is not None and value > hi):
        raise argparse.ArgumentTypeError(f"{allowed} (given {text})")
    return value


def at_least_zero(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    return _whole(text, 0, None, "an integer", "must be 0 or more")


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (pick a free one) to 65535."""
    return _whole(text, 0, 65535, "a port number", "a port is 0 to 65535")


def redacted(url: str) -> str:
    """``url`` without its password, fit to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def explain(exc: BaseException) -> str | None:
    """The one line for an error a command met because of what it was given, or None if ``exc`` is
    not one (then it is a fault, and its traceback is worth seeing)."""
    if isinstance(exc, UserError):
        return str(exc)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.title == "Settings":
        e = exc.errors(include_url=False)[0]
        name = "MOLO_" + "_".join(str(p) for p in e["loc"]).upper()
        given = f" (given {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        more = f"; and {len(exc.errors()) - 1} more" if len(exc.errors()) > 1 else ""
        return f"invalid setting {name}: {e['msg']}{given}{more} (README.md, Configuration, lists the settings)"
    import psycopg

    if isinstance(exc, psycopg.OperationalError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot use the database: {first} (check MOLO_DATABASE_URL or --database-url)"
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"the database has no MoLo schema yet ({str(exc).splitlines()[0]}): run `molo migrate` first"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return None


def database_url(given: str | None, configured: str | None) -> str:
    """The database URL a command uses (``--database-url``, else ``MOLO_DATABASE_URL``), checked."""
    import psycopg

    url = given or configured
    if not url:
        raise UserError("set MOLO_DATABASE_URL or pass --database-url")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise UserError(
            f"invalid database URL {redacted(url)!r}: {str(exc).strip()} (a URL is postgresql://user@host:port/dbname)"
        ) from None
    return url


def fail(command: str, message: str) -> int:
    """Print ``message`` as the command's one line; the exit code 2."""
    print(f"molo {command}: {message}", file=sys.stderr)
    return 2
