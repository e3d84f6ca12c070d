"""``braindino saliency``: where does the encoder (and a probe on it) look? Maps as NIfTI on the input's grid.

For each volume (``--image`` files, or the manifest's test rows — every row when there is no test split): the
last block's CLS attention (head-averaged and one volume per head), attention rollout, and — with ``--task`` — a
head-aware gradient map of a probe head trained on the manifest's training volumes with the probe's own code
(:mod:`.maps`, :mod:`.head_gradient`). Every map is written as NIfTI in the input's native voxel grid with its
affine, plus a PNG montage over the anatomy.

Exit status: 0 when every volume got its maps; 1 when some could not be read (one ``error:`` line each, the rest
are mapped); 2 when nothing was done (bad options, manifest or model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from time import perf_counter

import numpy as np
import pandas as pd

from braindino.errors import InputError

MAP_FILES = {"cls_attention": "cls_attention.nii.gz", "cls_attention_heads": "cls_attention_heads.nii.gz",
             "rollout": "rollout.nii.gz", "head_gradient": "head_gradient.nii.gz"}
INDEX_CSV = "saliency.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from braindino.saliency.head_gradient import SUPPORTED_POOLINGS

    parser.add_argument("--model", required=True, help="ViT encoder: braindino model folder, random:<arch> or a "
                                                        "timm ViT folder")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="volume to map (NIfTI, DICOM folder, MHA, NRRD); repeatable")
    parser.add_argument("--manifest", metavar="CSV", help="cohort: its test rows are mapped when no --image is "
                        "given; with --task its training rows train the probe head")
    parser.add_argument("--task", choices=("classification", "regression", "survival"),
                        help="train a probe head and add its gradient map")
    parser.add_argument("--target", metavar="COL", help="label column (classification / regression)")
    parser.add_argument("--time", metavar="COL", help="survival: time-to-event column")
    parser.add_argument("--event", metavar="COL", help="survival: event column")
    parser.add_argument("--sequence", help="the one sequence the head reads (needed when the manifest has several)")
    parser.add_argument("--pooling", choices=SUPPORTED_POOLINGS, default="max",
                        help="slice pooling of the head (default max; mil = attention-MIL, whose slice weights "
                             "weight the map)")
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear", help="head on pooled features")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="classification: map the evidence for this class (default: each volume's predicted "
                             "class)")
    parser.add_argument("--seed", type=int, default=0, help="head seed (default 0)")
    parser.add_argument("--no-montage", action="store_true", help="write the NIfTI maps only")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=1, help="processes extracting the training features")
    parser.add_argument("--slice-stride", type=int, default=1, metavar="K",
                        help="the head's training volumes: embed every K-th axial slice (as probe; default 1)")
    parser.add_argument("--features", metavar="DIR", help="features folder of this encoder for the head's training "
                        "volumes (e.g. a probe run's RUN/features/model): volumes already there with the same "
                        "settings are reused, the others added (default: OUT/features/<encoder>)")
    parser.add_argument("--device", default=None, help="encoder device (default cuda > mps > cpu)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: <volume>/*.nii.gz, "
                        "<volume>/montage.png, saliency.csv")


def run(args: argparse.Namespace) -> int:
    try:
        _paths, failed = saliency(
            args.model, args.out, images=args.image, manifest=args.manifest, task=args.task, target=args.target,
            time=args.time, event=args.event, sequence=args.sequence, pooling=args.pooling, head=args.head,
            class_name=args.class_name, seed=args.seed, montage=not args.no_montage, batch_size=args.batch_size,
            workers=args.workers, device=args.device, slice_stride=args.slice_stride, features_dir=args.features)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def run_saliency(model, out, images=None, manifest=None, task=None, target=None, **options) -> list[Path]:
    """Python entry point of ``braindino saliency``: the paths written (NIfTI maps, montages, saliency.csv).
    ``options``: the keyword arguments of :func:`saliency`. Raises InputError for bad input."""
    paths, _failed = saliency(model, out, images=images, manifest=manifest, task=task, target=target, **options)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _volumes(images, manifest, sequence) -> list[dict]:
    """[{path, volume_index, name, subject, sequence}] to map."""
    if images:
        return [{"path": str(p), "volume_index": None, "name": _safe(Path(p).name.split(".")[0]), "subject": "",
                 "sequence": ""} for p in images]
    rows = manifest[manifest["sequence"] == sequence] if sequence else manifest
    if "split" in rows.columns and (rows["split"] == "test").any():
        rows = rows[rows["split"] == "test"]
    return [{"path": r["path"], "volume_index": None if pd.isna(r.get("volume_index")) else int(r["volume_index"]),
             "name": _safe(f"{r['subject']}_{r['sequence']}" if r.get("sequence") else r["subject"]),
             "subject": r["subject"], "sequence": r.get("sequence", "")} for _, r in rows.iterrows()]


def train_head(encoder, manifest, spec, seed: int, features_dir: Path, workers: int, batch_size: int,
               slice_stride: int = 1):
    """Fit ``spec``'s head on the manifest's training samples (train + val rows; every labelled row without a
    split), embedded into (or reused from) ``features_dir`` → (fitted head, table)."""
    from braindino.probe.endpoints import build_table, restrict
    from braindino.probe.evaluate import quiet_expected_warnings
    from braindino.probe.fitting import fit_head, make_head
    from braindino.extract import embed_cohort
    from braindino.probe.inputs import feature_rows
    from braindino.robustness.evaluate import sample_inputs

    where = manifest.attrs.get("manifest_path", "manifest")
    table = build_table(manifest, spec)
    if len(table.sequences) != 1:
        raise InputError(where, f"the head would fuse {', '.join(table.sequences)}, a map needs one sequence",
                         "pass --sequence NAME")
    training = [i for i in range(len(table.samples)) if table.split is None or table.split[i] != "test"]
    rows = sorted({row for i in training for row in table.rows[i].values()})
    used = manifest.loc[rows]
    used.attrs.update(manifest.attrs)
    features = embed_cohort(encoder, used, cache_dir=features_dir, batch_size=batch_size, workers=workers,
                                    slice_stride=slice_stride)
    found = feature_rows(features, used)
    table = restrict(table, set(found), "not embedded")
    train = np.array([i for i in range(len(table.samples)) if table.split is None or table.split[i] != "test"])
    inputs = sample_inputs(table, features, found, where)
    with quiet_expected_warnings():
        head = fit_head(spec.task, make_head(spec.task, spec, seed), inputs, table.y, train)
    return head, table


def saliency(model, out, images=None, manifest=None, task=None, target=None, time=None, event=None, sequence=None,
             pooling: str = "max", head: str = "linear", class_name=None, seed: int = 0, montage: bool = True,
             batch_size: int = 32, workers: int = 1, device=None, slice_stride: int = 1,
             features_dir=None) -> tuple[list[Path], int]:
    """The whole run → (paths written, number of volumes that failed). The head's training features go to
    ``features_dir`` (default ``out/features/<encoder>``)."""
    from braindino import load_encoder
    from braindino.manifest import read_manifest
    from braindino.probe.endpoints import EndpointSpec
    from braindino.saliency.maps import vit_of

    started = perf_counter()
    out = Path(out)
    if not images and not manifest:
        raise InputError("command line", "nothing to map", "pass --image PATH or --manifest CSV")
    if task and not manifest:
        raise InputError("--task", "a probe head is trained on a manifest's training volumes", "pass --manifest CSV")
    encoder = load_encoder(model, device=device)
    vit_of(encoder)
    table_manifest = read_manifest(manifest) if manifest else None
    fitted, classes = None, None
    if task:
        spec = EndpointSpec(name=target or task, task=task, target=target, time=time, event=event,
                            sequences=[sequence] if sequence else None, pooling=pooling, head=head,
                            unit="auto").check("command line")
        features_dir = Path(features_dir) if features_dir else out / "features" / _safe(Path(str(encoder.name)).name)
        fitted, table = train_head(encoder, table_manifest, spec, seed, features_dir, workers, batch_size,
                                   slice_stride)
        classes = table.classes
        if class_name is not None and (classes is None or class_name not in classes):
            raise InputError("--class", f"{class_name!r} is not a class of {target}",
                             f"choose among {', '.join(classes or [])}")
    volumes = _volumes(images, table_manifest, sequence)
    names = {}
    for volume in volumes:                       # unique output folders
        count = names.get(volume["name"], 0)
        names[volume["name"]] = count + 1
        volume["name"] += f"_{count}" if count else ""
    paths, records, failed = [], [], 0
    for volume in volumes:
        try:
            record, written = map_volume(encoder, volume, out / volume["name"], fitted, pooling, task, classes,
                                         class_name, montage, batch_size)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        records.append(record)
        paths += written
    from braindino.atomic import atomic_path

    with atomic_path(out / INDEX_CSV) as tmp:
        pd.DataFrame(records).to_csv(tmp, index=False)
    paths.append(out / INDEX_CSV)
    print(f"saliency: {len(records)} of {len(volumes)} volume(s) mapped in {perf_counter() - started:.1f}s -> "
          f"{out}/<volume>/*.nii.gz{', montage.png' if montage else ''}, {INDEX_CSV}")
    return paths, failed


def map_volume(encoder, volume: dict, folder: Path, fitted, pooling, task, classes, class_name, montage: bool,
               batch_size: int) -> tuple[dict, list[Path]]:
    """Every map of one volume → (its saliency.csv record, paths written)."""
    from braindino.encoder.volume import ingest_source, volume_geometry
    from braindino.saliency.head_gradient import feature_gradients
    from braindino.saliency.maps import attention_maps, gradient_map
    from braindino.saliency.montage import saliency_montage
    from braindino.saliency.volume_maps import patch_maps_to_native, write_nifti
    from heads import SlicePooling

    loaded, prepared = ingest_source(volume["path"], volume["volume_index"], encoder.preprocessing)
    geometry = volume_geometry(loaded, prepared, encoder.input_size, encoder.grid)
    slices, z = prepared.slices, prepared.z_indices
    maps = attention_maps(encoder, slices, batch_size)
    foreground = slices > 0

    def to_native(patch_map):
        return patch_maps_to_native(patch_map, z, geometry, encoder.patch_size, foreground)

    native = {"cls_attention": to_native(maps.cls_attention),
              "cls_attention_heads": np.stack([to_native(maps.cls_attention_heads[:, h])
                                               for h in range(maps.cls_attention_heads.shape[1])], axis=-1),
              "rollout": to_native(maps.rollout)}
    record = {"name": folder.name, "path": volume["path"], "subject": volume["subject"],
              "sequence": volume["sequence"], "n_slices": len(z)}
    if fitted is not None:
        inputs = [maps.features] if pooling == "mil" else SlicePooling(pooling).fit([maps.features]).transform(
            [maps.features])
        class_code = None
        if task == "classification":
            probabilities = fitted.predict_proba(inputs)[0]
            predicted = int(np.asarray(fitted.classes_)[int(np.argmax(probabilities))])
            class_code = classes.index(class_name) if class_name is not None else predicted
            record.update(predicted=classes[predicted], mapped_class=classes[class_code],
                          probability=float(probabilities[list(np.asarray(fitted.classes_)).index(class_code)]))
        gradients, slice_weights, output = feature_gradients(fitted, pooling, task, maps.features, class_code)
        patch_map = gradient_map(encoder, slices, gradients, batch_size)
        patch_map = patch_map / max(float(patch_map.max()), 1e-12)
        native["head_gradient"] = to_native(patch_map)
        record["head_output"] = output
        if slice_weights is not None:
            record["top_slice_z"] = int(z[int(np.argmax(slice_weights))])
    written = []
    for key, data in native.items():
        written.append(write_nifti(folder / MAP_FILES[key], data, geometry))
        record[key] = str(written[-1])
    if montage:
        import nibabel as nib

        shown = [(label, nib.load(str(folder / MAP_FILES[key]))) for key, label in
                 (("head_gradient", "probe gradient"), ("cls_attention", "CLS attention"), ("rollout", "rollout"))
                 if key in native]
        written.append(saliency_montage(volume["path"], shown, folder / "montage.png", title=folder.name))
        record["montage"] = str(written[-1])
    return record, written
