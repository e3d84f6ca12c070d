"""``braindino configs``: list the training configs shipped inside the package (:mod:`braindino.train.catalog`)."""

import sys


def add_arguments(parser) -> None:
    from braindino.train.catalog import CONFIGS_FOLDER

    parser.epilog = (f"Use a name as `braindino train --config NAME`; the files are in {CONFIGS_FOLDER} "
                     "(copy one to start your own).")


def run(args) -> int:
    from omegaconf import OmegaConf

    from braindino.train.catalog import CONFIGS_FOLDER, describe, shipped_configs

    rows = []
    for name, path in shipped_configs().items():
        config = OmegaConf.load(path)   # every shipped config states its objective, arch and patch size
        rows.append((name, str(config.objective), f"{config.model.arch}/{config.model.patch_size}", describe(path)))
    if not rows:
        print(f"error: no configs in {CONFIGS_FOLDER}: the installation is incomplete, reinstall braindino",
              file=sys.stderr)
        return 1
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    return 0
