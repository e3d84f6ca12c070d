"""``braindino demo``: the main job end to end on the embedded synthetic cohort, each stage one ``braindino``
command (:mod:`braindino.demo` holds the config, the endpoints and the summaries).

Exit status: 0 when every stage ran (or was up to date), else the first failing stage's status.
"""

from pathlib import Path

from braindino.atomic import atomic_write_text
from braindino.cli.arguments import add_out, add_workers, comma_list, positive_int
from braindino.demo import CONFIG, ENDPOINTS_YAML, SCRATCH_ARGS, StageClock, demo_summary
from braindino.demo_report import write_demo_report


def add_arguments(parser) -> None:
    add_out(parser, "DIR", "folder for the cohorts, the store, the run, the model, the probe report (default demo)",
            required=False, default="demo")
    parser.add_argument("--subjects", type=positive_int, default=16, help="training-cohort subjects (4 sequences each)")
    parser.add_argument("--heldout-subjects", type=positive_int, default=32,
                        help="subjects of the held-out cohort the encoder is probed on (made with seed + 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=1.5,
                        help="voxel size of the synthetic volumes in mm (default 1.5: `prepare` resamples them to the "
                             "store's 1 mm grid; the 96 px encoder sees a whole slice at 2.3 mm a pixel)")
    parser.add_argument("--iters", type=positive_int, default=None, help="pretraining steps (default: the config's)")
    add_workers(parser)
    parser.add_argument("--config", default=CONFIG, help="pretraining config: a shipped config's name "
                                                        "(`braindino configs`) or a YAML file (default: %(default)s)")
    parser.add_argument("--fractions", type=comma_list(float), default=[10.0, 100.0], metavar="LIST",
                        help="probe training fractions in percent (default 10,100)")
    parser.add_argument("--segmentation", action="store_true",
                        help="also probe tumour segmentation (a decoder on every slice's patch tokens: adds tens of "
                             "minutes on a CPU)")
    parser.add_argument("--shots", type=comma_list(int), default=None, metavar="LIST", help="probe k-shot settings per class (default: the probe's 1,5, "
                                                      "on the endpoints that have classes); '' for none")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], metavar="LIST",
                        help="probe seeds (default 0,1,2)")
    parser.add_argument("--bootstrap", type=positive_int, default=500, help="bootstrap resamples for CIs and paired tests")
    parser.add_argument("--no-scratch", action="store_true",
                        help="leave the supervised-from-scratch CNN baseline out of the probe (it adds about a minute)")
    parser.add_argument("--finetune", action="append", default=[], metavar="last:K|lora:R",
                        help="also fine-tune the pretrained ViT per training set in the probe (tens of minutes on a "
                             "CPU; default: not run)")
    parser.add_argument("--slice-stride", type=positive_int, default=4,
                        help="probe on every K-th axial slice of the held-out volumes (default 4: 6 mm apart at "
                             "1.5 mm)")


def run(args) -> int:
    from braindino.cli import main as braindino

    out = Path(args.out)
    if args.iters is None:
        from braindino.errors import InputError
        from braindino.train.config import load_config

        try:
            args.iters = int(load_config(args.config).optim.iters)
        except ValueError as err:
            raise InputError(args.config, str(err), "give a shipped config's name or a YAML file") from err
    fractions, seeds = ",".join(f"{f:g}" for f in args.fractions), ",".join(map(str, args.seeds))
    shots = None if args.shots is None else ",".join(map(str, args.shots))
    cohort, store, run_dir, model = out / "cohort", out / "store", out / "run", out / "model"
    heldout, probe_dir = out / "heldout", out / "probe"
    segmentation_dir, robustness_dir, saliency_dir = out / "probe_segmentation", out / "robustness", out / "saliency"
    clock = StageClock()

    def unless_done(result: Path, *inputs: Path):
        """Skip a stage whose result exists and is newer than every input it was made from."""
        def decide(stage):
            def run_stage() -> int:
                if result.exists() and all(result.stat().st_mtime >= i.stat().st_mtime for i in inputs):
                    print(f"  {result} is up to date: kept")
                    return 0
                return stage()
            return run_stage
        return decide

    def synth(folder: Path, subjects: int, seed: int) -> int:
        if (folder / "manifest.csv").exists():
            print(f"  {folder}/manifest.csv exists: kept")
            return 0
        return braindino(["synth", "--out", str(folder), "--subjects", str(subjects), "--seed", str(seed),
                          "--resolution", str(args.resolution), "--workers", str(args.workers)])

    def pretrain() -> int:
        train_args = ["train", "--config", args.config, "--data", str(store), "--out", str(run_dir),
                      f"optim.iters={args.iters}", f"seed={args.seed}", "train.knn_label=sequence",
                      f"train.knn_every={max(args.iters // 3, 1)}"]
        return braindino(train_args + (["--resume"] if (run_dir / "checkpoints").exists() else []))

    def probe() -> int:
        endpoints = out / "endpoints.yaml"
        atomic_write_text(endpoints, ENDPOINTS_YAML)
        return braindino(["probe", "--model", str(model), "--manifest", str(heldout / "manifest.csv"),
                          "--endpoints", str(endpoints), "--protocol", "cv", "--skip-infeasible",
                          "--fractions", fractions, *(["--shots", shots] if shots is not None else []),
                          "--slice-stride", str(args.slice_stride),
                          *([] if args.no_scratch else SCRATCH_ARGS),
                          *[a for spec in args.finetune for a in ("--finetune", spec)],
                          "--seeds", seeds, "--bootstrap", str(args.bootstrap), "--workers",
                          str(args.workers), "--out", str(probe_dir)])

    def probe_segmentation() -> int:
        """Tumour masks from frozen patch tokens, on the held-out subjects that have one (FLAIR, every slice)."""
        import pandas as pd

        manifest = pd.read_csv(heldout / "manifest.csv")
        with_masks = manifest[manifest["mask"].notna()]
        tumour_manifest = heldout / "manifest_tumour.csv"
        atomic_write_text(tumour_manifest, with_masks.to_csv(index=False))
        return braindino(["probe", "--model", str(model), "--manifest", str(tumour_manifest), "--task",
                          "segmentation", "--mask", "mask", "--sequences", "FLAIR", "--protocol", "cv",
                          "--folds", "3", "--fractions", "100", "--shots", "", "--seeds", "0", "--bootstrap",
                          str(args.bootstrap), "--workers", str(args.workers), "--out", str(segmentation_dir)])

    def robustness() -> int:
        grid = ["--grid", "gamma=0.6,1.6", "--grid", "bias_field=0.3", "--grid", "gibbs=0.3"]
        return braindino(["robustness", "--model", str(model), "--manifest", str(heldout / "manifest.csv"),
                          "--task", "classification", "--target", "sequence", "--protocol", "split",
                          "--perturbations", "gamma,bias_field,gibbs", *grid,
                          "--slice-stride", str(args.slice_stride), "--features-root", str(probe_dir / "features"),
                          "--bootstrap", str(args.bootstrap), "--workers", str(args.workers),
                          "--out", str(robustness_dir)])

    def saliency() -> int:
        """Maps of a tumour-vs-rest probe for the first two held-out tumour subjects' FLAIR volumes; the head trains
        on the probe's features of the model (same slices), so nothing is embedded twice."""
        import pandas as pd

        manifest = pd.read_csv(heldout / "manifest.csv")
        tumours = manifest[(manifest["diagnosis"] == "tumour") & (manifest["sequence"] == "FLAIR")
                           & (manifest["split"] == "test")].head(2)
        images = [argument for path in tumours["path"] for argument in ("--image", str(heldout / path))]
        return braindino(["saliency", "--model", str(model), "--manifest", str(heldout / "manifest.csv"), *images,
                          "--task", "classification", "--target", "diagnosis", "--class", "tumour",
                          "--sequences", "FLAIR", "--pooling", "mean", "--workers", str(args.workers),
                          "--slice-stride", str(args.slice_stride), "--features", str(probe_dir / "features" / "model"),
                          "--out", str(saliency_dir)])

    stages = [
        ("synth", f"synthesising {args.subjects} training subjects into {cohort}",
         lambda: synth(cohort, args.subjects, args.seed)),
        ("prepare", f"preparing the slice store {store}",
         lambda: braindino(["prepare", "--manifest", str(cohort / "manifest.csv"), "--out", str(store),
                            "--workers", str(args.workers)])),
        ("pretrain", f"pretraining ({Path(args.config).name}, {args.iters} steps) into {run_dir}", pretrain),
        ("export", f"exporting the teacher to {model}",
         unless_done(model / "config.json", run_dir / "checkpoints")(
             lambda: braindino(["export", "--checkpoint", str(run_dir), "--out", str(model)]))),
        ("held-out synth", f"synthesising {args.heldout_subjects} held-out subjects (seed {args.seed + 1}) into "
                           f"{heldout}", lambda: synth(heldout, args.heldout_subjects, args.seed + 1)),
        ("probe", f"probing the held-out cohort's endpoints (pretrained vs random init vs pixels"
                  f"{'' if args.no_scratch else ' vs scratch'}) into "
                  f"{probe_dir}", unless_done(probe_dir / "metrics.json", model / "config.json")(probe)),
        ("robustness", f"robustness of the sequence probe to gamma, bias field and Gibbs ringing into "
                       f"{robustness_dir}", unless_done(robustness_dir / "metrics.json", model / "config.json")(
                           robustness)),
        ("saliency", f"saliency maps of a tumour probe on two held-out tumour subjects into {saliency_dir}",
         unless_done(saliency_dir / "saliency.csv", model / "config.json")(saliency)),
    ]
    if args.segmentation:   # opt-in: the decoder trains on every slice of every fold, far beyond the 15 minutes
        stages.insert(6, ("segmentation", f"probing tumour segmentation on the held-out tumour subjects into "
                                          f"{segmentation_dir}", unless_done(segmentation_dir / "metrics.json",
                                                                             model / "config.json")(probe_segmentation)))
    for number, (name, title, stage) in enumerate(stages, 1):
        print(f"[{number}/{len(stages)}] {title}", flush=True)
        status = clock.time(name, stage)
        if status:
            return status
    summary = demo_summary(run_dir, probe_dir, clock)
    report = write_demo_report(out, clock.line())
    print(summary)
    print(f"  one report: {report} and {report.with_suffix('.html')}")
    return 0


