"""``python -m central``: the platform's command line (central/cli.py)."""

import sys

from central.cli import main

sys.exit(main())
