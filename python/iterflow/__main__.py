"""``python -m iterflow``: the same command line as the ``iterflow`` script."""

from .cli import main

raise SystemExit(main())
