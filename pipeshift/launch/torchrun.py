"""torchrun for ``pipeshift launch --local``, with one summary line instead of its failure traceback.

``python -m pipeshift.launch.torchrun ARGS`` is ``python -m torch.distributed.run ARGS``, except
that when a rank fails torchrun's 40-line ``ChildFailedError`` traceback (after the ranks'
own one-line errors) becomes one line naming the first failed rank and its exit code, and the
exit status is that rank's.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        rank, first = failures[0]
        code = first.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        more = f"; {len(failures) - 1} more rank(s) failed after it" if len(failures) > 1 else ""
        print(f"pipeshift launch: rank {rank} {how}{more} (its own error is above)", file=sys.stderr, flush=True)
        return code if code > 0 else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
