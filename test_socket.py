"""Seed-compatible entry to the control-plane master: ``python test_socket.py [pipeshift master args]``.

Equivalent to ``pipeshift master …``; kept under this name because the prototype pipeshift grew
from started its master this way.
"""

import sys

if __name__ == "__main__":
    from pipeshift.cli import main

    sys.exit(main(["master", *sys.argv[1:]]))
