"""Entry point: ``python -m bench`` from the repository root (or ``make bench``).

``python -m bench server`` runs the OpenAI-server benchmark (bench/server.py).
"""

import sys

if sys.argv[1:2] == ["server"]:
    from bench.server import main as server_main

    sys.exit(server_main(sys.argv[2:]))

from bench.harness import main

sys.exit(main())
