"""``python -m xybrid`` runs the command line."""

from xybrid.cli import main

raise SystemExit(main())
