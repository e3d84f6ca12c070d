"""``python -m braindino.train`` / ``torchrun -m braindino.train ...``: the same command as ``train_dino.py``."""

import sys

from braindino.train.command import main

sys.exit(main())
