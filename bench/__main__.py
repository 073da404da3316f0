"""Entry point: ``python -m bench`` from the repository root (or ``make bench``)."""

import sys

from bench.harness import main

sys.exit(main())
