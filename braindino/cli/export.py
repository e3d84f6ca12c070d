"""``braindino export``: a training checkpoint's backbone → a model folder that timm and ``load_encoder`` read
(:func:`braindino.encoder.export.export_model`).

Exit status 0 when the folder was written, 2 when the checkpoint cannot be exported.
"""

from braindino.cli.arguments import add_out


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                        help="run folder of braindino train (its latest checkpoint) or a checkpoint file")
    add_out(parser, "MODEL_DIR", "model folder: config.json + model.safetensors (timm local-dir format)")
    parser.add_argument("--network", choices=("teacher", "student"),
                        help="which network's backbone to export (default: the teacher, or the student of a SimCLR "
                             "run, which has no teacher)")
    parser.add_argument("--with-heads", action="store_true",
                        help="also write the projection heads (DINO / iBOT / SimCLR) as heads.safetensors")


def run(args) -> int:
    from braindino.encoder.export import export_model

    config = export_model(args.checkpoint, args.out, network=args.network, with_heads=args.with_heads)
    provenance = config["braindino"]["provenance"]
    size = config["model_args"]["img_size"]
    print(f"braindino export: {provenance['network']} of {provenance['arch']} (depth {config['model_args']['depth']}, "
          f"patch {config['model_args']['patch_size']}, trained {provenance['steps']} steps at {size}px) "
          f"-> {args.out}")
    return 0
