"""``python train_dino.py`` / ``braindino train``: pretrain on a slice store, alone or under torchrun
(:func:`braindino.train.trainer.train`).

Exit status: 0 when every step ran, 75 (EX_TEMPFAIL) when the run stopped early with a checkpoint — a SIGTERM /
SIGUSR1 from a scheduler, or ``train.max_hours`` passed — and is continued by the same command with ``--resume``,
1 when training failed (bad store, damaged checkpoint, full disk, non-finite losses), 2 for a bad configuration.
"""

import os
import sys

from braindino.cli.arguments import add_out

STOPPED_EXIT_STATUS = 75   # EX_TEMPFAIL: "try again later" — requeue the job with --resume


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="a shipped config's name (list them with `braindino configs`), e.g. dino_vit_small, "
                             "or a YAML file")
    parser.add_argument("--data", required=True, help="slice store made by `braindino prepare`")
    add_out(parser, "RUN", "run directory: config.yaml, metrics.jsonl, checkpoints/")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, at any number of processes "
                             "(starts fresh when --out has none)")
    parser.add_argument("--resume-from", metavar="CHECKPOINT",
                        help="continue from this checkpoint file instead (e.g. RUN/checkpoints/step-00002500.pt)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.iters=2000 model.arch=vit_base")
    parser.epilog = ("Multi-GPU / multi-node: torchrun --nproc_per_node=8 [--nnodes=N --rdzv-endpoint=HOST:PORT] "
                     "train_dino.py ... ; optim.global_batch_size is the batch summed over all processes. "
                     "SIGTERM / SIGUSR1 (pre-emption) or train.max_hours stop after the current step with a "
                     "checkpoint and exit status 75; rerun with --resume to continue.")


def interrupted(args) -> str:
    return f"rerun with --resume to continue from the last checkpoint in {args.out}"


def run(args) -> int:
    from braindino.cli.boundary import RunFailed
    from braindino.errors import InputError, error_line
    from braindino.train.config import load_config
    from braindino.train.distributed import shutdown
    from braindino.train.trainer import train

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:   # YAML syntax, unknown keys, bad values: a bad configuration (exit 2)
        raise InputError(args.config, error_line(err), "fix the config file or the key=value overrides") from err
    try:
        resume = args.resume_from or ("latest" if args.resume else None)
        summary = train(config, args.data, args.out, resume=resume)
    except (InputError, OSError, ValueError, RuntimeError) as err:   # NonFiniteLossError is a RuntimeError
        raise RunFailed(err) from err
    finally:
        shutdown()
    rank_zero = summary["world_size"] == 1 or os.environ.get("RANK", "0") == "0"
    if summary["stopped"]:
        if rank_zero:
            print(f"stopped by {summary['stopped']} after step {summary['next_step']} of {config.optim.iters}; "
                  f"checkpoint {summary['checkpoint']} written — to continue, rerun the same command with --resume",
                  file=sys.stderr)
        return STOPPED_EXIT_STATUS
    if rank_zero:
        first, last = summary["first_losses"] or {}, summary["last_losses"] or {}
        if summary["steps_run"] == 0:
            print(f"{args.out} already holds all {summary['next_step']} steps: nothing to train")
            return 0
        print(f"pretrained {summary['objective']} for {summary['steps_run']} steps on {summary['world_size']} "
              f"process(es) [{summary['device']}, {summary['precision']}, attn={summary['attention']}] in "
              f"{summary['seconds']:.1f}s: loss {first.get('total', float('nan')):.4f} -> "
              f"{last.get('total', float('nan')):.4f}; run in {args.out}")
    return 0


def main(argv=None) -> int:
    """``train_dino.py`` and ``python -m braindino.train``: this command as a program of its own."""
    from braindino.cli import standalone

    return standalone("train_dino.py", "train", argv)
