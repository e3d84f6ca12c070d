"""Where training metrics go: ``RUN/metrics.jsonl`` always (one JSON object per line), wandb when enabled."""

import json
import secrets
from pathlib import Path

from omegaconf import OmegaConf

from braindino.atomic import atomic_write_text


class MetricsLog:
    """Rank 0 writes; other ranks hold a disabled log so call sites need no rank checks."""

    def __init__(self, run_dir, config, enabled: bool):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if config.train.wandb:
            import wandb

            id_file = Path(run_dir) / "wandb_id"   # one wandb run across every resume of this run directory
            if not id_file.exists():
                atomic_write_text(id_file, secrets.token_hex(8))
            self.wandb_run = wandb.init(project=config.train.wandb_project, dir=str(run_dir),
                                        config=OmegaConf.to_container(config, resolve=True),
                                        name=Path(run_dir).name, id=id_file.read_text().strip(), resume="allow")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir) -> list[dict]:
    """All records of ``RUN/metrics.jsonl`` (the last record per step wins after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
