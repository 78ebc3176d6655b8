"""``python -m bbct``: the ``bbct`` command."""

from bbct.simulator.cli import main

raise SystemExit(main())
