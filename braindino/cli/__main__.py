"""``python -m braindino.cli``: the ``braindino`` command."""

import sys

from braindino.cli import main

sys.exit(main())
