"""``pipeshift launch --local N --elastic …``: run N ranks here and restart them when the job changes size or fails.

torchrun restarts a failed worker group at the same size; what pipeshift needs besides is a
restart at *another* size, when a resize was asked for (``pipeshift ctl resize``) or when a
worker is gone for good (``--on-failure shrink``). This supervisor does both for one machine,
one process per rank (``pipeshift train --rank R --world-size N --dist-addr 127.0.0.1:PORT``),
on a fresh port for every round:

* every rank exits 0 — done;
* every rank exits :data:`~pipeshift.runtime.restart.EXIT_REGROUP` — a planned resize: the
  ranks have written a checkpoint and ``elastic.json`` with the new size; restart with it;
* otherwise one rank failed (the survivors follow within ``--timeout``, or are killed after a
  grace period) — restart from the last consistent checkpoint, on the same number of ranks
  (``--on-failure restart``) or one fewer (``shrink``), at most ``--max-restarts`` times.

Every round gets ``--resume``: each rank loads the checkpoint's FQNs onto the plan in force, or
onto a re-plan when the number of ranks changed. ``PIPESHIFT_ATTEMPT`` tells the ranks which
round they are in (fault-injection test hooks fire in round 0 only). Across machines, use
torchrun's elastic agent instead (``--nnodes MIN:MAX --max-restarts R``, same ``--resume``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeshift.errors import PipeshiftError
from pipeshift.jsonfile import read_json_object
from pipeshift.runtime.distributed import free_port
from pipeshift.runtime.cli import READY_ENV
from pipeshift.runtime.restart import ELASTIC_FILE, EXIT_REGROUP
from pipeshift.testing.faults import ATTEMPT_ENV


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` among ``pipeshift train``'s flags (the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, train_args: Sequence[str], workers: int, *, python: str = sys.executable,
                 max_restarts: int = 3, min_workers: int = 1, max_workers: int | None = None,
                 on_failure: str = "restart", grace_s: float | None = None, out=sys.stderr):
        self.train_args = list(train_args)
        if "--resume" not in self.train_args:
            self.train_args.append("--resume")
        ckpt = flag_value(self.train_args, "--checkpoint-dir")
        if not ckpt:
            raise PipeshiftError("--elastic needs --checkpoint-dir: restarted ranks resume from it")
        for flag in ("--rank", "--world-size", "--dist-addr"):
            if flag_value(self.train_args, flag) is not None:
                raise PipeshiftError(f"--elastic sets {flag} itself; leave it out")
        if on_failure not in ("restart", "shrink"):
            raise PipeshiftError("--on-failure: restart or shrink")
        self.checkpoint_dir = Path(ckpt)
        self.workers = workers
        self.python = python
        self.max_restarts = max_restarts
        self.min_workers = max(1, min_workers)
        # A resize asks for processes on this machine: never more than it has cores, unless told.
        self.max_workers = max_workers if max_workers is not None else max(workers, os.cpu_count() or 1)
        self.on_failure = on_failure
        timeout = flag_value(self.train_args, "--timeout")
        self.grace_s = grace_s if grace_s is not None else float(timeout or 60) + 15.0
        self.out = out
        self.rounds: list[dict] = []

    def say(self, text: str) -> None:
        print(f"pipeshift launch: {text}", file=self.out, flush=True)

    def run(self) -> int:
        failures = 0
        attempt = 0
        n = self.workers
        while True:
            codes, first = self._round(n, attempt)
            self.rounds.append({"attempt": attempt, "workers": n, "codes": codes, "first_failed": first})
            attempt += 1
            if all(c == 0 for c in codes):
                if attempt > 1:
                    self.say(f"finished on {n} workers after {attempt - 1} restart(s)")
                return 0
            if all(c in (0, EXIT_REGROUP) for c in codes) and EXIT_REGROUP in codes:
                wanted = self._requested_size()
                if wanted is None:
                    self.say(f"ranks asked for a restart but {self.checkpoint_dir / ELASTIC_FILE} is missing")
                    return 1
                n = self._bounded(wanted)
                bound = f" (asked for {wanted}; --min-workers {self.min_workers}, --max-workers {self.max_workers})"
                self.say(f"resize: restarting on {n} workers from the last checkpoint{bound if n != wanted else ''}")
                continue
            failures += 1
            if all(c == 1 for c in codes):
                self.say("every rank reported an error (see above); not restarting")
                return 1
            if failures > self.max_restarts:
                self.say(f"giving up after {self.max_restarts} restart(s)")
                return next(c for c in codes if c != 0) if any(c > 0 for c in codes) else 1
            if self.on_failure == "shrink":
                n = self._bounded(n - 1)
            self.say(f"rank {first} failed ({_describe(codes[first])}); restarting {n} workers from the last "
                     f"consistent checkpoint (restart {failures} of {self.max_restarts})")

    def _bounded(self, n: int) -> int:
        return min(max(self.min_workers, n), self.max_workers)

    def _requested_size(self) -> int | None:
        path = self.checkpoint_dir / ELASTIC_FILE
        try:
            data = read_json_object(path, "resize request")
            path.unlink()
        except (OSError, PipeshiftError):
            return None
        size = data.get("world_size")
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None

    def _round(self, n: int, attempt: int) -> tuple[list[int], int | None]:
        with tempfile.TemporaryDirectory(prefix="pipeshift-ready-") as ready:
            return self._round_in(n, attempt, Path(ready))

    def _round_in(self, n: int, attempt: int, ready: Path) -> tuple[list[int], int | None]:
        port = free_port()
        env = dict(os.environ, **{ATTEMPT_ENV: str(attempt), READY_ENV: str(ready)})
        procs = []
        for r in range(n):
            cmd = [self.python, "-m", "pipeshift", "train", *self.train_args, "--rank", str(r), "--world-size",
                   str(n), "--dist-addr", f"127.0.0.1:{port}"]
            procs.append(subprocess.Popen(cmd, env=env))
        first: int | None = None
        deadline = None
        try:
            while any(p.poll() is None for p in procs):
                failed = [(r, p.poll()) for r, p in enumerate(procs) if p.poll() not in (None, 0, EXIT_REGROUP)]
                if failed and first is None:
                    # A dead rank's peers fail right after it, often before we look: within one
                    # look, one killed by a signal is the cause, the others' errors its effect.
                    first = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))[0]
                    deadline = time.monotonic() + self.grace_s
                    if not all((ready / f"rank{r}").exists() for r in range(n)):
                        # Dead before the group formed: its peers would wait out the whole
                        # rendezvous timeout for it. Nothing to save yet, so stop them now.
                        self.say(f"rank {first} died during start-up ({_describe(dict(failed)[first])}); "
                                 "stopping the others now")
                        deadline = time.monotonic()
                if deadline is not None and time.monotonic() > deadline:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                time.sleep(0.05)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            raise
        codes = [p.wait() for p in procs]
        if first is None and any(c not in (0, EXIT_REGROUP) for c in codes):  # all ended between two looks
            killed = [r for r, c in enumerate(codes) if c < 0]
            first = killed[0] if killed else next(r for r, c in enumerate(codes) if c not in (0, EXIT_REGROUP))
        return codes, first
