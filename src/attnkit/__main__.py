"""`python -m attnkit` (and `torchrun -m attnkit`) run the CLI."""

import sys

from attnkit.cli import main

sys.exit(main())
