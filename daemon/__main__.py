"""``python -m daemon`` runs the same CLI as the ``streamv2v`` console script."""

from daemon.cli import main

raise SystemExit(main())
