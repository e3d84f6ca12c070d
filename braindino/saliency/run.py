"""``run_saliency``: where does the encoder (and a probe on it) look? The Python API behind ``braindino
saliency``; maps as NIfTI on the input's grid.

For each volume (``images``, or the manifest's test rows — every row when there is no test split): the last
block's CLS attention (head-averaged and one volume per head), attention rollout, and — with ``task`` — a
head-aware gradient map of a probe head trained on the manifest's training volumes with the probe's own code
(:mod:`.maps`, :mod:`.head_gradient`; the head's inputs are :func:`braindino.probe.inputs.sample_inputs`). Every map
is written as NIfTI in the input's native voxel grid with its affine, plus a PNG montage over the anatomy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np
import pandas as pd

from braindino.errors import InputError, error_line

MAP_FILES = {"cls_attention": "cls_attention.nii.gz", "cls_attention_heads": "cls_attention_heads.nii.gz",
             "rollout": "rollout.nii.gz", "head_gradient": "head_gradient.nii.gz"}
INDEX_CSV = "saliency.csv"
TASKS = ("classification", "regression", "survival")


@dataclass
class SaliencyRun:
    """What :func:`run_saliency` wrote: ``paths`` (NIfTI maps, montages, saliency.csv), ``records`` (the rows of
    saliency.csv, one per mapped volume) and ``failed`` (volumes that could not be read)."""

    paths: list
    records: list
    failed: int


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def _volumes(images, manifest, sequence) -> list[dict]:
    """[{path, volume_index, name, subject, sequence, mask}] to map (mask: the volume's lesion mask path from the
    manifest's ``mask`` column, also for an ``--image`` the manifest lists; "" when there is none)."""
    if images:
        masks = {}
        if manifest is not None and "mask" in manifest.columns:
            masks = {str(Path(p).resolve()): m for p, m in zip(manifest["path"], manifest["mask"]) if isinstance(m, str)}
        return [{"path": str(p), "volume_index": None, "name": _safe(Path(p).name.split(".")[0]), "subject": "",
                 "sequence": "", "mask": masks.get(str(Path(p).resolve()), "")} for p in images]
    rows = manifest[manifest["sequence"] == sequence] if sequence else manifest
    if "split" in rows.columns and (rows["split"] == "test").any():
        rows = rows[rows["split"] == "test"]
    return [{"path": r["path"], "volume_index": None if pd.isna(r.get("volume_index")) else int(r["volume_index"]),
             "name": _safe(f"{r['subject']}_{r['sequence']}" if r.get("sequence") else r["subject"]),
             "subject": r["subject"], "sequence": r.get("sequence", ""),
             "mask": r["mask"] if isinstance(r.get("mask"), str) else ""} for _, r in rows.iterrows()]


def train_head(encoder, manifest, spec, seed: int, features_dir: Path, workers: int, batch_size: int,
               slice_stride: int = 1):
    """Fit ``spec``'s head on the manifest's training samples (train + val rows; every labelled row without a
    split), embedded into (or reused from) ``features_dir`` → (fitted head, table)."""
    from braindino.probe.endpoints import build_table, restrict
    from braindino.probe.evaluate import quiet_expected_warnings
    from braindino.probe.fitting import fit_head, make_head
    from braindino.extract import embed_cohort
    from braindino.probe.inputs import feature_rows, sample_inputs

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


def run_saliency(model, out, *, images=None, manifest=None, task=None, target=None, time=None, event=None,
                 sequence=None, pooling: str = "max", head: str = "linear", class_name=None, seed: int = 0,
                 montage: bool = True, batch_size: int = 32, workers: int = 1, device=None, slice_stride: int = 1,
                 features=None) -> SaliencyRun:
    """Map ``images`` (paths) or ``manifest``'s test volumes with ``model`` into ``out``; with ``task`` (and its
    label columns, the one ``sequence`` the head reads) also a probe head's gradient map, for ``class_name`` (default:
    each volume's predicted class). The head's training features go to ``features`` (default
    ``out/features/<encoder>``). A volume that cannot be read is one ``error:`` line and counted in ``failed``;
    raises InputError for bad input."""
    from braindino import load_encoder
    from braindino.manifest import read_manifest
    from braindino.probe.endpoints import EndpointSpec
    from braindino.saliency.maps import vit_of

    started = perf_counter()
    out = Path(out)
    if not images and not manifest:
        raise InputError("command line", "nothing to map", "pass --image PATH or --manifest CSV")
    if task is not None and task not in TASKS:
        raise InputError("--task", f"saliency maps a {', '.join(TASKS)} head, not {task!r}", "choose one of those")
    if slice_stride < 1:
        raise InputError("--slice-stride", f"must be at least 1, got {slice_stride}", "pass --slice-stride 1")
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
        features_dir = Path(features) if features else out / "features" / _safe(Path(str(encoder.name)).name)
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
    return SaliencyRun(paths, records, failed)


def _lesion(path: str):
    """The manifest's lesion mask of a volume as a nibabel image, None when it has no foreground voxel (the montage
    then cuts around the map's maximum); InputError naming the file when it cannot be read (raised before any map
    of the volume is written)."""
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(path, f"lesion mask could not be read: {error_line(err)}",
                         "fix or remove the manifest's mask cell") from None
    return image if (data > 0).any() else None


def map_volume(encoder, volume: dict, folder: Path, fitted, pooling, task, classes, class_name, montage: bool,
               batch_size: int) -> tuple[dict, list[Path]]:
    """Every map of one volume → (its saliency.csv record, paths written)."""
    from braindino.encoder.volume import ingest_source, volume_geometry
    from braindino.saliency.head_gradient import feature_gradients
    from braindino.saliency.maps import attention_maps, gradient_map
    from braindino.saliency.montage import saliency_montage
    from braindino.saliency.volume_maps import patch_maps_to_native, write_nifti
    from heads import SlicePooling

    lesion = _lesion(volume["mask"]) if volume.get("mask") else None
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
        written.append(saliency_montage(volume["path"], shown, folder / "montage.png", title=folder.name,
                                        lesion=lesion))
        record["montage"] = str(written[-1])
        record["montage_cuts"] = "through the lesion mask" if lesion is not None else "around the map's maximum"
    return record, written
