"""``python -m lab.simulators NAME --pty``: a simulated device in its own process
(lab/simulators/cli.py; ``--help`` lists them)."""

import sys

from lab.simulators.cli import main

sys.exit(main())
