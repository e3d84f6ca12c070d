"""``braindino export``: a training checkpoint's backbone → a model folder that timm and ``load_encoder`` read.

Exit status 0 when the folder was written, 2 when the checkpoint cannot be exported.
"""

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                        help="run folder of braindino train (its latest checkpoint) or a checkpoint file")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR",
                        help="model folder: config.json + model.safetensors (timm local-dir format)")
    parser.add_argument("--network", choices=("teacher", "student"),
                        help="which network's backbone to export (default: the teacher, or the student of a SimCLR "
                             "run, which has no teacher)")
    parser.add_argument("--with-heads", action="store_true",
                        help="also write the projection heads (DINO / iBOT / SimCLR) as heads.safetensors")


def run(args: argparse.Namespace) -> int:
    from braindino.encoder.export import export_model
    from braindino.errors import InputError, error_line

    try:
        config = export_model(args.checkpoint, args.out, network=args.network, with_heads=args.with_heads)
    except (InputError, OSError) as err:   # a write error is an OutputError naming the folder and space needed
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    provenance = config["braindino"]["provenance"]
    size = config["model_args"]["img_size"]
    print(f"braindino export: {provenance['network']} of {provenance['arch']} (depth {config['model_args']['depth']}, "
          f"patch {config['model_args']['patch_size']}, trained {provenance['steps']} steps at {size}px) "
          f"-> {args.out}")
    return 0
