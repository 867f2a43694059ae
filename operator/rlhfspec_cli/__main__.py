"""``python -m rlhfspec_cli`` is ``rlhfspec``."""

from rlhfspec_cli.main import main

raise SystemExit(main())
