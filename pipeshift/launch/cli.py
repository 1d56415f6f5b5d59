"""Launch ranks: ``pipeshift launch --local N PKG …`` or ``pipeshift launch --hosts hosts.txt [--ssh] PKG …``.

Everything after the launcher's own flags is passed to ``pipeshift train`` unchanged.

* ``--local N`` runs N ranks on this machine through torchrun
  (``python -m torch.distributed.run --standalone --nproc-per-node N -m pipeshift train …``):
  torchrun starts, watches and stops the processes; pipeshift adds no process manager of its own.
* ``--hosts FILE`` prints the command for each machine — torchrun with its c10d rendezvous on
  the first host — and the explicit-rank alternative (``--rank R --world-size W --dist-addr``,
  one process per rank, for fixed rank placement). With ``--ssh`` it runs the torchrun commands
  over ssh, prefixing every output line with its host, and fails if any machine fails.
  When the package's plan placed its ranks on a measured link matrix (``plan --topology`` with
  netcheck's matrix: ``rank_to_worker``), the per-rank commands put each rank on the machine the
  plan chose, and ``--ssh`` runs those instead: torchrun's rendezvous numbers ranks in the order
  machines join, which would undo the placement.

* ``--local N --elastic`` runs them under pipeshift's supervisor instead (``supervisor.py``):
  restarted from the last checkpoint when a rank fails or a resize is asked for, possibly on
  another number of ranks (needs ``--checkpoint-dir``).

hosts.txt: one machine per line, ``HOST [SLOTS]`` or ``HOST slots=SLOTS`` (processes to start
there, default 1); ``#`` starts a comment.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from pipeshift.errors import InputFileError, PipeshiftError
from pipeshift.launch.protocol import TOKEN_ENV
from pipeshift.runtime.allocator import HUGE_PAGES_ENV

_HOST_RE = re.compile(r"^[A-Za-z0-9_.:\[\]@-]+$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", type=int, metavar="N", help="run N ranks on this machine (torchrun)")
    where.add_argument("--hosts", metavar="FILE", help="machines, one per line: HOST [SLOTS]")
    p.add_argument("--ssh", action="store_true", help="with --hosts: run the commands over ssh instead of printing")
    p.add_argument("--ssh-program", default="ssh", help="ssh client to use (default: ssh)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first host (default 29500)")
    p.add_argument("--workdir", default=None, help="with --hosts: directory to cd into on each machine "
                                                    "(default: this one)")
    p.add_argument("--python", default=None, help="python on the machines (default: this interpreter)")
    p.add_argument("--dry-run", action="store_true", help="with --local: print the torchrun command, do not run it")
    e = p.add_argument_group("elastic (with --local)")
    e.add_argument("--elastic", action="store_true",
                   help="supervise the ranks: restart from the last checkpoint after a failure or a resize")
    e.add_argument("--max-restarts", type=int, default=3, help="failures tolerated (default %(default)s)")
    e.add_argument("--on-failure", choices=["restart", "shrink"], default="restart",
                   help="after a failure restart on as many ranks, or one fewer (default %(default)s)")
    e.add_argument("--min-workers", type=int, default=1, help="never fewer ranks than this (default %(default)s)")
    e.add_argument("--max-workers", type=int, default=None, help="never more ranks than this")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="PKG and `pipeshift train` flags")


def run(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if train_args and train_args[0] == "train":
        train_args = train_args[1:]
    if not train_args:
        raise PipeshiftError("give the stage package and train flags, e.g. `pipeshift launch --local 2 stages/ --steps 10`")
    python = args.python or sys.executable
    if args.elastic and args.local is None:
        raise PipeshiftError("--elastic works with --local N (across machines use torchrun's elastic agent)")
    if args.local is not None:
        if args.local < 1:
            raise PipeshiftError("--local N needs N >= 1")
        if args.elastic:
            from pipeshift.launch.supervisor import Supervisor

            if args.max_restarts < 0:
                raise PipeshiftError("--max-restarts must be >= 0")
            sup = Supervisor(train_args, args.local, python=python, max_restarts=args.max_restarts,
                             min_workers=args.min_workers, max_workers=args.max_workers, on_failure=args.on_failure)
            try:
                return sup.run()
            except KeyboardInterrupt:
                return 130
        cmd = local_command(python, args.local, train_args)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return _run_local(cmd, args.local)
    hosts = read_hosts(args.hosts)
    if not 0 < args.port < 65536:
        raise PipeshiftError(f"--port {args.port}: not a port number")
    workdir = args.workdir or os.getcwd()
    placed = placed_hosts(train_args, hosts)
    plans = host_commands(python, hosts, args.port, train_args)
    if not args.ssh:
        print(describe(plans, hosts, args.port, workdir, python, train_args, placed))
        return 0
    if placed is not None:
        return _run_ssh(args.ssh_program, explicit_commands(python, hosts, args.port, train_args, placed), workdir)
    return _run_ssh(args.ssh_program, plans, workdir)


def local_command(python: str, n: int, train_args: list[str]) -> list[str]:
    """torchrun (through pipeshift's wrapper: one line when a rank fails) for N ranks here.

    ``--`` after the module keeps torchrun's parser off pipeshift's flags: it would take
    ``--master`` for an ambiguous abbreviation of its own ``--master-addr``/``--master-port``.
    """
    return [python, "-m", "pipeshift.launch.torchrun", "--standalone", "--nproc-per-node", str(n),
            "-m", "pipeshift", "--", "train", *train_args]


def _local_env(n: int) -> dict[str, str]:
    """Share the cores among the local ranks unless the user chose a thread count; huge pages for big tensors.

    torchrun sets ``OMP_NUM_THREADS=1`` for every worker when the variable is unset, which the
    train command then has to honour as the user's choice; on a many-core host that leaves all
    but N cores idle. Setting it here to cores ÷ N keeps torchrun's intent (no oversubscription).

    Blocks above the malloc tuning's mmap threshold (:mod:`pipeshift.runtime.allocator`) are
    mapped afresh each time, a page fault per 4 KiB; torch's CPU allocator advises tensors of
    2 MB and more as transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is in its environment
    at start-up (it reads it once, so it must be set before the rank starts). Measured here: a
    fresh 206 MB gradient (50257 × 1024 floats) took 270 ms with 4 KiB pages and 107 ms with
    huge pages, as fast as memory kept in the heap. Unset, or set by the user, it is left alone.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, n))))
    env.setdefault(*HUGE_PAGES_ENV)
    return env


def _run_local(cmd: list[str], n: int) -> int:
    proc = subprocess.Popen(cmd, env=_local_env(n))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun forwards the signal to its workers and exits
        proc.wait()
        return 130


def read_hosts(path: str) -> list[tuple[str, int]]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputFileError(p, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(p, None, f"unreadable: {e}") from None
    hosts: list[tuple[str, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        host = fields[0]
        if not _HOST_RE.match(host) or host.startswith("-"):
            raise InputFileError(p, lineno, f"{host!r} is not a host name")
        slots = 1
        if len(fields) > 2:
            raise InputFileError(p, lineno, "expected HOST [SLOTS]")
        if len(fields) == 2:
            value = fields[1].removeprefix("slots=")
            if not value.isdigit() or int(value) < 1:
                raise InputFileError(p, lineno, f"slots {fields[1]!r}: expected a positive integer")
            slots = int(value)
        if any(h == host for h, _ in hosts):
            raise InputFileError(p, lineno, f"host {host!r} listed twice (give it more slots instead)")
        hosts.append((host, slots))
    if not hosts:
        raise InputFileError(p, None, "no hosts listed")
    return hosts


def host_commands(python: str, hosts: list[tuple[str, int]], port: int, train_args: list[str]) -> list[tuple[str, list[str]]]:
    """The torchrun command for each machine (c10d rendezvous on the first host).

    torchrun needs two things said that it otherwise guesses from the hostname: ``--local-addr``
    (the address the other machines reach this one by: it becomes MASTER_ADDR for rank 0's
    machine, and the rendezvous advertises it) and ``--rdzv-conf is_host=…`` (which machine runs
    the rendezvous store: torchrun decides by comparing the endpoint with its own hostname, which
    fails for aliases, IPs of another interface, or a hostname that resolves to loopback).
    """
    master = hosts[0][0]
    job = "pipeshift-" + uuid.uuid4().hex[:8]
    out = []
    for i, (host, slots) in enumerate(hosts):
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--nproc-per-node", str(slots),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{_bracket(master)}:{port}", "--rdzv-id", job,
               "--rdzv-conf", f"is_host={'true' if i == 0 else 'false'}", "--local-addr", host,
               "--max-restarts", "0", "-m", "pipeshift", "--", "train", *train_args]
        out.append((host, cmd))
    return out


def explicit_commands(python: str, hosts: list[tuple[str, int]], port: int, train_args: list[str],
                      rank_hosts: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """One command per rank: rank r on ``rank_hosts[r]`` when given, else host by host in file order."""
    if rank_hosts is None:
        rank_hosts = [host for host, slots in hosts for _ in range(slots)]
    world = len(rank_hosts)
    # rank 0 runs the process group's store, so the address every rank dials is rank 0's machine
    addr = f"{_bracket(rank_hosts[0])}:{port}"
    return [(host, [python, "-m", "pipeshift", "train", *train_args, "--rank", str(rank), "--world-size", str(world),
                    "--dist-addr", addr]) for rank, host in enumerate(rank_hosts)]


def placed_hosts(train_args: list[str], hosts: list[tuple[str, int]]) -> list[str] | None:
    """The machine of each rank, when the package's plan placed its ranks on measured links; else None.

    The plan says which *worker* runs each rank (``rank_to_worker``) and, when planned on a
    netcheck matrix, which machine each worker was (``topology.hosts``): ranks go to those machines
    when the hosts file lists them, else worker w is the w-th slot of the hosts file.
    """
    from pipeshift.plan import plan_file, read_plan

    package = next((a for a in train_args if not a.startswith("-")), None)
    if package is None or not plan_file(package).is_file():
        return None
    plan = read_plan(package)
    doc = plan.doc
    if doc.get("placement") != "measured links":
        return None
    source = str(plan_file(package))
    r2w = doc.get("rank_to_worker")
    if (not isinstance(r2w, list) or len(r2w) != plan.world_size
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in r2w)
            or len(set(r2w)) != len(r2w)):
        raise InputFileError(source, None, f"rank_to_worker must list {plan.world_size} distinct worker numbers, "
                                           "one per rank (as `pipeshift plan` writes it)")
    slots = dict(hosts)
    topo = doc.get("topology")
    named = topo.get("hosts") if isinstance(topo, dict) else None
    if isinstance(named, list) and all(isinstance(h, str) for h in named) and max(r2w) < len(named) \
            and all(h in slots for h in named):
        rank_hosts = [named[w] for w in r2w]
        for host in set(rank_hosts):
            if rank_hosts.count(host) > slots[host]:
                raise PipeshiftError(f"the plan places {rank_hosts.count(host)} ranks on {host}; the hosts file gives "
                                     f"it {slots[host]} slot(s)")
        return rank_hosts
    by_slot = [host for host, n in hosts for _ in range(n)]
    if max(r2w) >= len(by_slot):
        raise PipeshiftError(f"the plan places a rank on worker {max(r2w)}; the hosts file has {len(by_slot)} slots "
                             "(list the machines in the order netcheck measured them)")
    return [by_slot[w] for w in r2w]


def describe(plans, hosts, port: int, workdir: str, python: str, train_args: list[str],
             placed: list[str] | None = None) -> str:
    world = sum(s for _, s in hosts) if placed is None else len(placed)
    lines = [f"# {world} ranks on {len(hosts)} machines. Run on each machine (torchrun, c10d rendezvous at "
             f"{hosts[0][0]}:{port}; --local-addr is the address the other machines reach it by, is_host=true "
             "marks the machine that runs the rendezvous store; each rank binds the interface that routes to "
             "MASTER_ADDR, or --iface NAME after `train`):", ""]
    if "--master" in train_args or any(a.startswith("--master=") for a in train_args):
        lines[-1:-1] = [f"# The master's token is not written here: set {TOKEN_ENV} or pass --master-token-file "
                        "on every machine."]
    if placed is not None:
        where = ", ".join(f"{r} -> {h}" for r, h in enumerate(placed))
        lines[-1:-1] = [f"# The plan placed its ranks on measured links (rank -> machine: {where}). torchrun's "
                        "rendezvous numbers ranks in the order machines join and does not follow it: use the "
                        "per-rank commands below (`--ssh` does)."]
    for host, cmd in plans:
        lines.append(f"[{host}] cd {shlex.quote(workdir)} && {shlex.join(cmd)}")
    if placed is None:
        lines += ["", "# Or, to fix which ranks run where (stage_to_rank_map), one process per rank:", ""]
    else:
        lines += ["", "# One process per rank, on the machines the plan chose:", ""]
    for host, cmd in explicit_commands(python, hosts, port, train_args, placed):
        lines.append(f"[{host}] cd {shlex.quote(workdir)} && {shlex.join(cmd)} &")
    return "\n".join(lines)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _run_ssh(ssh: str, plans: list[tuple[str, list[str]]], workdir: str) -> int:
    """Run every machine's command over ssh; stop the rest as soon as one fails."""
    procs = []
    lock = threading.Lock()

    def pump(host: str, stream) -> None:  # one reader per machine, not per tensor
        for line in iter(stream.readline, ""):
            with lock:
                sys.stdout.write(f"[{host}] {line}")
                sys.stdout.flush()

    readers = []
    for host, cmd in plans:
        remote = f"cd {shlex.quote(workdir)} && {shlex.join(cmd)}"
        proc = subprocess.Popen([*shlex.split(ssh), host, remote], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, stdin=subprocess.DEVNULL)
        procs.append((host, proc))
        t = threading.Thread(target=pump, args=(host, proc.stdout), daemon=True)
        t.start()
        readers.append(t)
    worst = 0
    try:
        pending = list(procs)
        while pending:
            for item in list(pending):
                host, proc = item
                try:
                    code = proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(item)
                if code != 0 and worst == 0:
                    worst = code
                    print(f"pipeshift launch: {host} exited with {code}; stopping the others", file=sys.stderr)
                    for _, other in pending:
                        other.terminate()
    except KeyboardInterrupt:
        for _, proc in procs:
            proc.terminate()
        worst = 130
    for t in readers:
        t.join(timeout=5)
    return worst
