"""`python -m archeio`: the same as the `archeio` command."""

from .cli import main

raise SystemExit(main())
