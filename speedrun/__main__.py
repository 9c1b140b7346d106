"""`python -m speedrun ...`: the same commands as the `speedrun` console script."""

import sys

from speedrun.cli import main

sys.exit(main())
