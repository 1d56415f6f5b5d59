"""Talk to a running master: status, repartition --plan FILE, resize --workers N, policy on|off.

The master's address comes from ``--master``, else ``$PIPESHIFT_MASTER``, else
127.0.0.1 on the default port; the token from ``--token-file``, else ``$PIPESHIFT_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from pipeshift.errors import PipeshiftError
from pipeshift.launch import protocol
from pipeshift.launch.client import CtlClient
from pipeshift.plan import read_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master", default=None, metavar="HOST:PORT",
                        help=f"the master (default ${protocol.MASTER_ENV}, else 127.0.0.1:{protocol.DEFAULT_PORT})")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help=f"file holding the shared secret (default ${protocol.TOKEN_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="give up after S seconds (default %(default)s)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = sub.add_parser("status", help="workers, their last reports, the policy and queued commands")
    status.add_argument("--json", action="store_true", help="print the master's raw answer as JSON")
    repartition = sub.add_parser("repartition", help="queue a plan for the workers' next flush boundary")
    repartition.add_argument("--plan", required=True, metavar="PLAN_JSON", help="plan.json with the new stages")
    repartition.add_argument("--at-step", type=int, default=None,
                             help="earliest step to switch at (default: the step after the latest reported)")
    resize = sub.add_parser("resize", help="restart the job on N workers (planned removal or addition); "
                                           "needs ranks under `pipeshift launch --elastic` or torchrun")
    resize.add_argument("--workers", type=int, required=True, metavar="N", help="the new number of ranks")
    resize.add_argument("--at-step", type=int, default=None,
                        help="earliest step to resize at (default: the step after the latest reported)")
    policy = sub.add_parser("policy", help="switch automatic repartitioning on or off")
    policy.add_argument("state", choices=["on", "off"])


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _ms(times: dict[str, Any] | None, name: str) -> str | None:
    if not times or name not in times:
        return None
    return f"{1e3 * times[name]:.2f}"


def format_status(status: dict[str, Any]) -> str:
    rows = []
    for w in status["workers"]:
        report = w.get("last_report") or {}
        mine = (report.get("stage_times") or {}).get(str(w["stage"]))
        rows.append([
            w["rank"], w["stage"], w["host"], w["pid"], w["state"] + (f" ({w['reason']})" if w["reason"] else ""),
            f"{w['last_seen_s']:.1f}", w["step"], report.get("step"),
            _ms(mine, "compute_s"), _ms(mine, "wait_s"), _ms(mine, "comm_s"),
        ])
    lines = [f"workers ({len(rows)}, heartbeat timeout {status['heartbeat_timeout_s']} s):"]
    if rows:
        lines.append(_table(["rank", "stage", "host", "pid", "state", "seen_s_ago", "step", "report_step",
                             "compute_ms", "wait_ms", "comm_ms"], rows))
    else:
        lines.append("  none registered")
    policy = status["policy"]
    state = "on" if policy["enabled"] else "off"
    if not policy["active"]:
        lines.append(f"policy: {state}, inactive (master started without --plan)")
    else:
        lines.append(f"policy: {state}; window {policy['window']}, imbalance streak {policy['streak']}, "
                     f"cool-down {policy['cooldown_left']}")
        last = policy.get("last_decision")
        if last:
            verdict = "repartition" if last["repartition"] else "keep"
            lines.append(f"  last decision (window {last['window']}, step {last['step']}): {verdict} — {last['reason']}; "
                         f"imbalance {last['imbalance']:.3f}, speed factors "
                         + ", ".join(f"{s:.2f}" for s in last["speed_factors"]))
    if status["commands"]:
        lines.append("commands:")
        lines.append(_table(
            ["id", "type", "source", "at_step", "stages", "workers", "delivered_to", "acks"],
            [[c["id"], c["type"], c["source"], c["at_step"], c["stages"], c.get("world_size"),
              ",".join(map(str, c["delivered_to"])) or None,
              ", ".join(f"{r}:{s.split(':')[0]}" for r, s in c["acks"].items()) or None] for c in status["commands"]],
        ))
        for c in status["commands"]:  # why a command was refused, as the ranks said it
            reasons = {s.partition(":")[2].strip() for s in c["acks"].values() if s.startswith("rejected:")}
            ranks = [r for r, s in c["acks"].items() if s.startswith("rejected")]
            for why in sorted(reasons):
                lines.append(f"  #{c['id']} rejected by rank{'s' if len(ranks) > 1 else ''} {','.join(ranks)}: {why}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    token = protocol.read_token(args.token_file)
    if not token:
        raise PipeshiftError(f"no token: pass --token-file FILE or set {protocol.TOKEN_ENV}")
    address = args.master or os.environ.get(protocol.MASTER_ENV) or f"127.0.0.1:{protocol.DEFAULT_PORT}"
    # a plan file is checked here, before it goes anywhere near the workers
    plan = read_plan(args.plan) if args.action == "repartition" else None
    with CtlClient(address, token, timeout_s=args.timeout) as ctl:
        if args.action == "status":
            status = ctl.status()
            print(json.dumps(status, indent=1) if args.json else format_status(status))
        elif args.action == "repartition":
            reply = ctl.repartition(plan, at_step=args.at_step)
            print(f"queued repartition #{reply['id']} ({plan.num_stages} stages): the ranks switch after step "
                  f"{reply['at_step']}, queued "
                  f"at {time.strftime('%H:%M:%S')}")
        elif args.action == "resize":
            if not 1 <= args.workers <= 1 << 16:
                raise PipeshiftError("--workers must be from 1 to 65536")
            reply = ctl.resize(args.workers, at_step=args.at_step)
            print(f"queued resize #{reply['id']} to {args.workers} workers: the ranks stop at step {reply['at_step']}, queued "
                  f"at {time.strftime('%H:%M:%S')}")
        else:
            reply = ctl.policy(args.state == "on")
            note = "" if reply.get("active") else " (inactive: the master has no --plan)"
            print(f"policy {args.state}{note}")
    return 0
