import sys

from pipeshift.cli import main

sys.exit(main())
