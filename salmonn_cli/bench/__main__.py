"""`python -m salmonn_cli.bench ...`: the same as scripts/bench.py."""

import sys

from .runner import main

sys.exit(main())
