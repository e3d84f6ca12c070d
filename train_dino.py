"""Pretrain a brain-MRI ViT by slice-wise self-distillation.

    python train_dino.py --config dino_vit_small --data STORE --out RUN [key=value ...]
    torchrun -m braindino.train --config dino_vit_small ...   (the same, from an installed wheel)
    torchrun --nproc_per_node=8 train_dino.py --config ... --data STORE --out RUN
"""

import sys

from braindino.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
