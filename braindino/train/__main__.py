"""``python -m braindino.train`` / ``torchrun -m braindino.train ...``: the same command as ``train_dino.py``."""

import sys

from braindino.cli.train import main

sys.exit(main())
