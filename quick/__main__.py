"""`python -m quick ...`: the same as the `quick` command."""

from quick.cli import main

raise SystemExit(main())
