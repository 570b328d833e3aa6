"""`python -m ruozhi_ui ...`: the command line in cli.py."""

import sys

from .cli import main

sys.exit(main())
