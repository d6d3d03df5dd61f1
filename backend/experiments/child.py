"""One experiment job's runner, as a process of its own: ``python -m backend.experiments.child DIR``.

Where it sits: started by ``molo worker`` (:mod:`backend.experiments.worker`) for each job it takes,
in a session of its own. It runs the runner (:func:`simulator.experiment.run_experiment`) on
``DIR/experiment.toml`` into ``DIR``, so every replication is stored as it ends and a new start
resumes from what is stored. Why a process: the model is CPU-bound Python; in a process of its own
it keeps the worker's event loop (heartbeats, cancel notifications) free, and it stops the way
``molo experiment run`` does on Ctrl-C: SIGINT to its process group, finished replications kept.

Guarantees the worker relies on:

- It dies with the worker: ``PR_SET_PDEATHSIG`` (Linux) sends it SIGKILL when the worker goes, even
  by SIGKILL, and each of its pool processes the same when it goes, so no orphan goes on running
  replications a new worker would run again.
- One runner per folder: it holds an exclusive ``flock`` on ``DIR/.runner.lock`` while it runs; a
  second one (a job taken over from a worker that only seemed dead) waits for it.
- ``DIR/progress.json`` says how far it is (``done``, ``target``) after every replication;
  ``DIR/outcome.json`` says how it ended (``succeeded``, ``failed`` with the one-line error,
  ``interrupted``) and names the HTML report if one was made. Exit codes: 0, 2 (failed), 130
  (interrupted). Its log (the runner's, tracebacks) goes to the worker's ``DIR/runner.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("backend.experiments.child")

PR_SET_PDEATHSIG = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel for SIGKILL when the parent process ends (Linux; elsewhere nothing). If the
    parent has already gone (it died before this ran), exit now."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(EXIT_INTERRUPTED)


def _pool_initializer() -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def stored_count(out: Path) -> int:
    """Finished replications stored in ``out``."""
    return sum(1 for _ in out.glob("runs/*/*.json"))


def _report(plan: Any, out: Path) -> tuple[str | None, str | None]:
    """The HTML report, where :mod:`simulator.report` exists: (file name in ``out``, error)."""
    try:
        from simulator.report import write_report  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return None, None
    try:
        made = write_report(plan, out)
    except Exception as exc:
        log.exception("the report could not be made")
        return None, f"{type(exc).__name__}: {exc}"
    candidates = [Path(made)] if isinstance(made, str | os.PathLike) else []
    candidates.append(out / "report.html")
    for path in candidates:
        full = path if path.is_absolute() else out / path
        if full.is_file() and full.resolve().parent == out.resolve():
            return full.name, None
    return None, "the report module made no HTML file in the results folder"


def run(out: Path, processes: int) -> int:
    """Run (or resume) the experiment in ``out``; the exit code."""
    from simulator.experiment import ExperimentError, load_experiment, run_experiment  # noqa: PLC0415

    lock = (out / ".runner.lock").open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends
    started = time.monotonic()
    try:
        plan = load_experiment(out / "experiment.toml")
        reused = stored_count(out)

        def progress(done: int, total: int) -> None:
            _write_json(out / "progress.json", {"done": reused + done, "target": reused + total})

        executor: Executor | None = None
        if processes > 1:
            executor = ProcessPoolExecutor(max_workers=processes, initializer=_pool_initializer)
        try:
            outcome = run_experiment(plan, out, executor=executor, workers=1, progress=progress)
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
    except ExperimentError as exc:
        _write_json(out / "outcome.json", {"status": "failed", "error": str(exc)})
        return EXIT_FAILED
    except KeyboardInterrupt:
        _write_json(out / "outcome.json", {"status": "interrupted", "error": None})
        return EXIT_INTERRUPTED
    except Exception as exc:
        log.exception("the experiment failed")
        _write_json(out / "outcome.json", {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_FAILED
    done = sum(outcome.replications.values())
    if outcome.interrupted:
        _write_json(out / "outcome.json", {"status": "interrupted", "error": None, "done": done})
        return EXIT_INTERRUPTED
    _write_json(out / "progress.json", {"done": done, "target": done})
    report, report_error = _report(plan, out)
    _write_json(
        out / "outcome.json",
        {
            "status": "succeeded",
            "error": None,
            "done": done,
            "ran": outcome.ran,
            "reused": outcome.reused,
            "report": report,
            "report_error": report_error,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.experiments.child", description=__doc__)
    parser.add_argument("out", type=Path, help="the job's results folder, holding experiment.toml")
    parser.add_argument("--processes", type=int, default=1, help="processes for the replications (default 1)")
    parser.add_argument("--parent", type=int, default=None, help="the worker's pid: exit if it is gone")
    args = parser.parse_args(argv)
    try:
        die_with_parent(args.parent)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        code = run(args.out, max(1, args.processes))
    except KeyboardInterrupt:  # before the runner had started (imports, planning)
        with contextlib.suppress(OSError):
            _write_json(args.out / "outcome.json", {"status": "interrupted", "error": None})
        code = EXIT_INTERRUPTED
    sys.stdout.flush()
    sys.stderr.flush()
    # At once, without joining a pool's threads: a pool process still in a replication gets SIGKILL
    # from its death signal as this process ends.
    os._exit(code)


if __name__ == "__main__":
    main()
