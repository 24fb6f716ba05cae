"""``python -m ml_worker`` → :func:`ml_worker.cli.main`."""

from ml_worker.cli import main

raise SystemExit(main())
