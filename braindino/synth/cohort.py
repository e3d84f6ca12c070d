"""The synthetic cohort: subjects planned from (seed, subject index), rendered to NIfTI, listed in a manifest.

Layout: ``DIR/sub-0001/sub-0001_T1w.nii.gz`` (one file per sequence, int16, the template's RAS affine at the
chosen resolution), ``DIR/sub-0001/sub-0001_tumour_mask.nii.gz`` for tumour subjects (uint8, 1 necrosis,
2 oedema, 3 enhancing), and ``DIR/manifest.csv`` with one row per image.
Every random draw comes from ``numpy.random.SeedSequence(seed, spawn_key=(index, stream))``, so a subject's
images depend on the seed, its index and the resolution only — not on the cohort size or the worker count.
"""

import gzip
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from braindino.atomic import atomic_path, atomic_write_text
from braindino.errors import InputError
from braindino.synth.anatomy import (
    AnatomyParams,
    SubjectTissues,
    Template,
    draw_anatomy,
    load_template,
    subject_coordinates,
    subject_tissues,
)
from braindino.synth.lesions import (
    Stroke,
    Tumour,
    WhiteMatterLesions,
    draw_stroke,
    draw_tumour,
    draw_white_matter_lesions,
    insert_stroke,
    insert_tumour,
    insert_white_matter_lesions,
    push_tissue,
    tumour_outcomes,
    tumour_shapes,
)
from braindino.synth.sequences import (
    SEQUENCES,
    draw_acquisition,
    render,
    tissue_texture,
)

MANIFEST_COLUMNS = ["path", "subject", "sequence", "split", "age", "sex", "diagnosis", "mutation", "time", "event",
                    "months_since_stroke", "mask"]
DIAGNOSIS_BLOCK = ("tumour",) * 3 + ("stroke",) * 2 + ("AD",) * 2 + ("CN",) * 3    # shuffled per 10 subjects
SPLIT_BLOCK = ("train",) * 14 + ("val",) * 3 + ("test",) * 3                      # shuffled per 20 subjects
STREAM_DIAGNOSIS, STREAM_SPLIT, STREAM_SUBJECT, STREAM_TEXTURE, STREAM_IMAGE = range(5)


def stream(seed: int, index: int, kind: int) -> np.random.Generator:
    """The random generator of one stream (``kind``) of subject or block ``index``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, kind)))


def _from_block(seed: int, index: int, block: tuple[str, ...], kind: int) -> str:
    """Subject ``index``'s entry of a shuffled block: exact proportions within every full block."""
    order = stream(seed, index // len(block), kind).permutation(len(block))
    return block[order[index % len(block)]]


@dataclass(frozen=True)
class SubjectPlan:
    """Everything drawn for one subject before any image is made."""

    index: int
    subject: str
    split: str
    diagnosis: str                          # "CN", "AD", "tumour" or "stroke"
    anatomy: AnatomyParams
    white_matter: WhiteMatterLesions
    tumour: Tumour | None
    outcomes: tuple[int, float, int] | None  # (mutation, time in months, event) of tumour subjects
    stroke: Stroke | None


def plan_subject(seed: int, index: int, template: Template) -> SubjectPlan:
    """Draw subject ``index`` (0-based): diagnosis, age (AD 60-90, others 20-90), sex, anatomy and lesions."""
    diagnosis = _from_block(seed, index, DIAGNOSIS_BLOCK, STREAM_DIAGNOSIS)
    rng = stream(seed, index, STREAM_SUBJECT)
    age = float(rng.uniform(60.0, 90.0) if diagnosis == "AD" else rng.uniform(20.0, 90.0))
    sex = str(rng.choice(["F", "M"]))
    anatomy = draw_anatomy(rng, age, sex, alzheimer_like=diagnosis == "AD")
    white_matter = draw_white_matter_lesions(rng, template, age)
    tumour = draw_tumour(rng, template) if diagnosis == "tumour" else None
    outcomes = tumour_outcomes(rng, tumour, age) if tumour is not None else None
    stroke = draw_stroke(rng) if diagnosis == "stroke" else None
    return SubjectPlan(index=index, subject=f"sub-{index + 1:04d}", split=_from_block(seed, index, SPLIT_BLOCK,
                       STREAM_SPLIT), diagnosis=diagnosis, anatomy=anatomy, white_matter=white_matter, tumour=tumour,
                       outcomes=outcomes, stroke=stroke)


def build_tissues(template: Template, plan: SubjectPlan) -> tuple[SubjectTissues, np.ndarray | None]:
    """The subject's tissue fractions on the output grid and, for tumour subjects, the ``[X, Y, Z]`` uint8
    tumour label mask."""
    coords = subject_coordinates(template, plan.anatomy)
    if plan.tumour is not None:
        region, shapes = tumour_shapes(template, coords, plan.tumour)
        push_tissue(template, coords, plan.tumour)
    tissues = subject_tissues(template, plan.anatomy, coords)
    insert_white_matter_lesions(template, coords, tissues, plan.white_matter)
    labels = None
    if plan.tumour is not None:
        labels = (insert_tumour(tissues, region, shapes) if region is not None
                  else np.zeros(template.shape, dtype=np.uint8))
    if plan.stroke is not None:
        insert_stroke(template, coords, tissues, plan.stroke)
    return tissues, labels


def render_subject(template: Template, plan: SubjectPlan, seed: int, sequences=SEQUENCES,
                   skull_stripped: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``({sequence: [X, Y, Z] int16 image}, tumour labels or None)`` of one planned subject."""
    tissues, labels = build_tissues(template, plan)
    texture = tissue_texture(stream(seed, plan.index, STREAM_TEXTURE), template.shape, template.spacing_mm)
    enhancement = plan.tumour.enhancement if plan.tumour is not None else 0.0
    rngs = [stream(seed, plan.index, STREAM_IMAGE + SEQUENCES.index(sequence)) for sequence in sequences]
    acquisitions = [draw_acquisition(rng, sequence, enhancement) for rng, sequence in zip(rngs, sequences)]
    return render(tissues, acquisitions, texture, rngs, skull_stripped), labels


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` as .nii.gz atomically; the gzip stream has no timestamp, so equal data give equal bytes."""
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code="scanner")
    image.set_qform(affine, code="scanner")
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


@dataclass(frozen=True)
class CohortSettings:
    out_dir: Path
    seed: int
    resolution_mm: float
    sequences: tuple[str, ...]
    skull_stripped: bool


def make_subject(settings: CohortSettings, index: int) -> list[dict]:
    """Plan, render and write subject ``index``; its manifest rows (paths relative to the cohort folder)."""
    template = load_template(settings.resolution_mm)
    plan = plan_subject(settings.seed, index, template)
    images, labels = render_subject(template, plan, settings.seed, settings.sequences, settings.skull_stripped)
    folder = settings.out_dir / plan.subject
    mask = None
    if labels is not None:
        mask = f"{plan.subject}/{plan.subject}_tumour_mask.nii.gz"
        save_nifti(settings.out_dir / mask, labels, template.affine)
    mutation, time, event = plan.outcomes if plan.outcomes is not None else (None, None, None)
    months = round(plan.stroke.months_since_stroke, 2) if plan.stroke is not None else None
    rows = []
    for sequence, image in images.items():
        save_nifti(folder / f"{plan.subject}_{sequence}.nii.gz", image, template.affine)
        rows.append({"path": f"{plan.subject}/{plan.subject}_{sequence}.nii.gz", "subject": plan.subject,
                     "sequence": sequence, "split": plan.split, "age": round(plan.anatomy.age, 1),
                     "sex": plan.anatomy.sex, "diagnosis": plan.diagnosis, "mutation": mutation, "time": time,
                     "event": event, "months_since_stroke": months, "mask": mask})
    return rows


def _pool(workers: int, resolution_mm: float) -> ProcessPoolExecutor:
    """Worker processes that share the parent's loaded template where processes fork."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=load_template,
                               initargs=(resolution_mm,))


def generate_cohort(out_dir, n_subjects: int = 24, seed: int = 0, resolution_mm: float = 1.0,
                    sequences=SEQUENCES, workers: int = 1, skull_stripped: bool = False,
                    progress: bool = False) -> pd.DataFrame:
    """Write ``n_subjects`` synthetic subjects and ``manifest.csv`` under ``out_dir``; return the manifest.

    ``sequences`` is any subset of ``SEQUENCES``; ``workers`` > 1 renders subjects in parallel processes with
    identical results. ``skull_stripped`` gives BraTS-like brain-only images on a zero background.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder", "choose another --out folder for the cohort")
    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown or not sequences or n_subjects < 1 or workers < 1:
        raise ValueError(f"need n_subjects >= 1, workers >= 1 and sequences among {SEQUENCES}, got "
                         f"{n_subjects}, {workers}, {list(sequences)}")
    load_template(resolution_mm)                           # once here; forked workers inherit it
    settings = CohortSettings(out_dir, seed, float(resolution_mm), tuple(sequences), skull_stripped)
    bar = tqdm(total=n_subjects, desc="synth", unit="subject", disable=not progress)
    rows: dict[int, list[dict]] = {}
    if workers == 1:
        for index in range(n_subjects):
            rows[index] = make_subject(settings, index)
            bar.update()
    else:
        with _pool(min(workers, n_subjects, os.cpu_count() or 1), resolution_mm) as pool:
            futures = {index: pool.submit(make_subject, settings, index) for index in range(n_subjects)}
            for index, future in futures.items():
                rows[index] = future.result()
                bar.update()
    bar.close()
    manifest = pd.DataFrame([row for index in sorted(rows) for row in rows[index]], columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"age": float, "time": float, "months_since_stroke": float, "mutation": "Int64",
                                "event": "Int64"})
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False))
    return manifest
