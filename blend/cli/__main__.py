"""`python -m blend.cli`: the `cacheblend` command."""

import sys

from blend.cli import main

sys.exit(main())
