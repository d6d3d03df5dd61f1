"""Every ``molo`` command answers a user error with one line on stderr (``molo <command>: what,
where, what is allowed``) and exit code 2: never a traceback, never argparse's usage block, never
pydantic's help URL. Each case runs the real command line in a child process, as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFUSED = "postgresql://nobody:secret@127.0.0.1:1/molo"  # nothing listens on port 1

CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    # (command, arguments, environment, what the line must say)
    ("demo", ["--speed", "-5"], {}, "argument --speed: must be above 0 (given -5)"),
    ("demo", ["--port", "70000"], {}, "a port is 0 to 65535"),
    ("demo", ["--boxes", "900"], {}, "--boxes 900: the scenario's network has 50 boxes"),
    ("demo", ["--scenario", "missing.toml"], {}, "scenario file missing.toml not found"),
    ("demo", ["--set", "simulation.dayz=3"], {}, "did you mean 'simulation.days'?"),
    ("experiment", ["run", "missing.toml"], {}, "missing.toml: cannot read the experiment file"),
    ("experiment", ["run", "x.toml", "--workers", "0"], {}, "argument --workers: must be above 0"),
    ("experiment", ["status", "/nonexistent"], {}, "is not an experiment folder"),
    ("experiment", [], {}, "required: {run,status,report,compare}"),
    ("simulate", ["--days", "-1"], {}, "simulation.days: Input should be greater than 0"),
    ("simulate", ["--bogus", "1"], {}, "unrecognized arguments: --bogus 1"),
    ("impact", ["--method-set", "residents.box_car_share=3"], {}, "residents.box_car_share: Input should be less"),
    ("impact", ["--group-by", "hour"], {}, "argument --group-by: invalid choice: 'hour'"),
    ("boxes", ["--count", "0", "--credentials", "c.json"], {}, "argument --count: must be above 0"),
    ("boxes", ["--credentials", "/nonexistent/credentials.json"], {}, "cannot use /nonexistent/credentials.json"),
    ("migrate", ["--database-url", "nonsense"], {}, "invalid database URL 'nonsense'"),
    ("migrate", ["--database-url", REFUSED], {}, "cannot use the database: connection failed"),
    ("ingest", [], {"MOLO_MQTT_PORT": "x"}, "invalid setting MOLO_MQTT_PORT"),
    ("api", ["--port", "-1"], {}, "argument --port: a port is 0 to 65535"),
    ("api", [], {"MOLO_API_PORT": "abc"}, "invalid setting MOLO_API_PORT"),
    ("worker", ["--concurrency", "0"], {}, "argument --concurrency: must be above 0"),
    ("worker", [], {"MOLO_EXPERIMENT_WORKER_CONCURRENCY": "abc"}, "MOLO_EXPERIMENT_WORKER_CONCURRENCY"),
    ("provision", [], {}, "give --boxes N and/or --box-id ID"),
    ("provision", ["--boxes", "-1"], {}, "argument --boxes: must be 0 or more"),
    ("provision", ["--boxes", "2", "--out", "/proc/molo"], {}, "cannot use /proc/molo"),
    ("box", ["--box-id", "BAD!ID"], {}, "invalid --box-id 'BAD!ID'"),
    ("box", ["--box-id", "aal-001"], {}, "no password: pass --credentials or set MOLO_BOX_PASSWORD"),
    ("keys", [], {}, "required: {create,list,revoke}"),
    ("keys", ["--database-url", REFUSED, "list"], {}, "cannot use the database"),
    ("schemas", ["--out", "/proc/molo"], {}, "cannot write results to --out /proc/molo"),
]


@pytest.mark.parametrize(
    ("command", "args", "env", "expected"), CASES, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)]
)
def test_a_user_error_is_one_line_and_exit_2(
    command: str, args: list[str], env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOLO_")}
    environ |= {"MOLO_DATABASE_URL": REFUSED, **env} if command == "demo" else env
    done = subprocess.run(
        [sys.executable, "-m", "molo.cli", command, *args],
        cwd=tmp_path,  # nothing the command writes lands in the repo
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    err = done.stderr
    assert done.returncode == 2, err
    assert re.match(rf"molo {command}( [a-z]+)?: ", err), err  # `molo experiment run: ...`
    assert err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert "usage:" not in err
    assert "errors.pydantic.dev" not in err
    assert "secret" not in err  # a URL's password is never printed


def test_every_option_has_help() -> None:
    """Every option of every command says what it does (``--help`` is the first place a user looks);
    ``molo box``'s are the firmware stub's own (``molo box --help``)."""
    import argparse

    from molo.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
            elif not isinstance(action, argparse._HelpAction) and not action.help and action.dest != "rest":
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser())
    assert missing == []
