"""`python -m iprange`: the same as the `iprange` command."""

from .cli import main

raise SystemExit(main())
