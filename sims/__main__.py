"""`python -m sims ARGS`: the same as `ipop-overlay sim ARGS`."""

import sys

from sims.cli import main

sys.exit(main())
