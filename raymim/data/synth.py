"""CT-like phantoms with organs, lesions, label maps, radiology-style reports and site domains.

Each phantom is a torso in a ``size^3`` grid: a body outline (subcutaneous fat around soft
tissue), liver (patient's right), two kidneys, two lungs (upper half), a spine, scanner noise,
and 1-3 lesions inside the liver, a kidney or a lung with random size and contrast. Values are
Hounsfield units stored as int16 NIfTI with a correct affine; labels (:data:`LABELS`) as uint8.

"Sites" differ like scanners do: voxel spacing, noise level, contrast scaling, how much of the
field of view the patient fills, and the stored axis orientation (site 0 writes RAS, site 1
LPS, site 2 LAS, then repeat), so preprocessing must reorient and multi-domain methods (HSSL)
have a domain tag to predict.

Example::

    manifest = generate_phantoms("phantoms", cases=8, size=48, seed=0)  # phantoms/manifest.csv
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "liver",
    3: "kidney_right",
    4: "kidney_left",
    5: "lung_right",
    6: "lung_left",
    7: "bone",
    8: "lesion",
}
LESION = 8

# Organ centres / radii in normalised RAS+ coordinates ([-1, 1] across the field of view; as in
# nibabel, +x points to the patient's Right, +y Anterior, +z Superior), and their HU.
_ORGANS = {
    2: ((0.35, 0.05, -0.35), (0.38, 0.35, 0.30), 60.0),  # liver
    3: ((0.38, -0.35, -0.60), (0.12, 0.10, 0.18), 35.0),  # kidney_right
    4: ((-0.38, -0.35, -0.60), (0.12, 0.10, 0.18), 35.0),  # kidney_left
    5: ((0.38, 0.00, 0.45), (0.30, 0.40, 0.45), -850.0),  # lung_right
    6: ((-0.38, 0.00, 0.45), (0.28, 0.40, 0.45), -850.0),  # lung_left
}
# (spacing mm, noise HU, contrast scale, orientation codes, field-of-view zoom)
# The zoom is how much of the field of view the patient fills (a site's reconstruction FOV
# protocol): 1.0 fills it like the reference, 0.75 leaves a wider rim of air around the body.
_SITES = [
    ((1.5, 1.5, 1.5), 12.0, 1.00, "RAS", 1.0),
    ((1.0, 1.0, 2.5), 25.0, 1.15, "LPS", 0.85),
    ((0.8, 0.8, 3.0), 40.0, 0.90, "LAS", 0.7),
]
LESION_RADIUS = (0.04, 0.12)  # normalised units ([-1, 1] across the field of view)
LESION_CONTRAST_HU = (25.0, 80.0)  # |lesion - organ| before the site's contrast scale


def _site(k: int) -> tuple[tuple[float, float, float], float, float, str, float]:
    spacing, noise, contrast, codes, zoom = _SITES[k % len(_SITES)]
    extra = k // len(_SITES)  # more sites than presets: vary spacing a little
    return tuple(s * (1 + 0.1 * extra) for s in spacing), noise * (1 + 0.2 * extra), contrast, codes, zoom


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def _phantom(rng: np.random.Generator, size: int, site: int):
    """-> (hu int16 [X,Y,Z] in RAS order, label uint8, report str, spacing)."""
    spacing, noise, contrast, _, zoom = _site(site)
    ax = np.linspace(-1, 1, size, dtype=np.float32) / zoom
    grid = np.meshgrid(ax, ax, ax, indexing="ij")
    x, y, _z = grid
    label = np.zeros((size,) * 3, np.uint8)
    hu = np.full((size,) * 3, -1000.0, np.float32)
    bx, by = 0.85 + rng.uniform(-0.05, 0.05), 0.65 + rng.uniform(-0.05, 0.05)
    body = (x / bx) ** 2 + (y / by) ** 2 <= 1.0
    inner = (x / (bx - 0.08)) ** 2 + (y / (by - 0.08)) ** 2 <= 1.0
    label[body] = 1
    hu[body] = -100.0  # fat
    hu[inner] = 40.0  # soft tissue / muscle
    for lab, (centre, radii, value) in _ORGANS.items():
        c = np.asarray(centre) + rng.uniform(-0.04, 0.04, 3)
        m = _ellipsoid(grid, c, np.asarray(radii) * rng.uniform(0.9, 1.1, 3)) & inner
        label[m] = lab
        hu[m] = value * (contrast if value > 0 else 1.0)
    spine = ((x / 0.1) ** 2 + ((y + 0.45) / 0.1) ** 2 <= 1.0) & inner
    label[spine] = 7
    hu[spine] = 700.0
    half_fov = 0.5 * size * np.asarray(spacing)
    findings = []
    for _ in range(int(rng.integers(1, 4))):
        organ = int(rng.choice([2, 2, 3, 4, 5, 6]))
        idx = np.argwhere(label == organ)
        if len(idx) == 0:
            continue
        centre_vox = idx[rng.integers(len(idx))]
        centre = ax[centre_vox]
        r = rng.uniform(*LESION_RADIUS)
        m = _ellipsoid(grid, centre, (r, r, r)) & (label == organ)
        delta = rng.choice([-1, 1]) * rng.uniform(*LESION_CONTRAST_HU) * contrast
        base = -850.0 if organ in (5, 6) else None
        hu[m] = (base + 800.0 + delta) if base is not None else hu[m] + delta
        label[m] = LESION
        diam_mm = 2 * r * zoom * float(np.mean(half_fov))
        name = LABELS[organ]
        side = "right" if name.endswith("right") or organ == 2 else "left"
        organ_word = {"liver": "liver", "kidney": "kidney", "lung": "lung"}[name.split("_")[0]]
        kind = "nodule" if organ in (5, 6) else ("hypodense" if delta < 0 else "hyperdense") + " lesion"
        findings.append(f"A {diam_mm:.0f} mm {kind} in the {side} {organ_word}.")
    hu += rng.normal(0.0, noise, hu.shape).astype(np.float32)
    report = "CT chest and abdomen. " + (" ".join(findings) if findings else "No focal lesion.")
    return np.clip(hu, -1024, 3071).astype(np.int16), label, report, spacing


def _to_codes(data: np.ndarray, spacing, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-ordered array in another axis orientation, with the matching affine."""
    size = np.asarray(data.shape)
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = -0.5 * (size - 1) * np.asarray(spacing)  # centre at the world origin
    for axis, (have, want) in enumerate(zip("RAS", codes, strict=True)):
        if have != want:
            data = np.flip(data, axis)
            affine[:3, 3] += affine[:3, axis] * (size[axis] - 1)
            affine[:3, axis] *= -1
    return np.ascontiguousarray(data), affine


def generate_phantoms(out_dir: str | os.PathLike, cases: int, size: int = 64, seed: int = 0,
                      sites: int = 3) -> Path:
    """Write ``cases`` phantoms (NIfTI image + label) and ``manifest.csv``; return its path.

    Deterministic per ``(seed, case index)``. Manifest columns: image, label, report, domain
    (paths relative to the manifest).
    """
    if cases < 1 or size < 16 or sites < 1:
        raise ValueError(f"need cases >= 1, size >= 16, sites >= 1, got {cases}, {size}, {sites}.")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        site = i % sites
        hu, label, report, spacing = _phantom(rng, size, site)
        codes = _site(site)[3]
        img_arr, affine = _to_codes(hu, spacing, codes)
        lab_arr, _ = _to_codes(label, spacing, codes)
        name = f"case_{i:05d}.nii.gz"
        for arr, sub in ((img_arr, "images"), (lab_arr, "labels")):
            nii = nib.Nifti1Image(arr, affine)
            nii.header.set_xyzt_units("mm")
            nii.set_qform(affine, code=1)
            nii.set_sform(affine, code=1)
            nib.save(nii, out / sub / name)
        rows.append({"image": f"images/{name}", "label": f"labels/{name}", "report": report,
                     "domain": f"site{site}"})
    return write_manifest(out / "manifest.csv", rows)


MANIFEST_COLUMNS = ("image", "label", "report", "domain")


def write_manifest(path: str | os.PathLike, rows: list[dict[str, str]]) -> Path:
    """Write a phantom-style manifest (columns :data:`MANIFEST_COLUMNS`, paths relative to it)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


PHANTOMS_RECORD = "phantoms.json"


def reuse_or_generate_phantoms(out_dir: str | os.PathLike, cases: int, size: int = 64, seed: int = 0,
                               sites: int = 3, log=None) -> Path:
    """The manifest of the phantoms in ``out_dir`` when they were generated with these arguments,
    else generate them (``log(message)`` is told). A folder that holds phantoms made with other
    arguments is refused (``ValueError`` naming both), so a changed setting never trains on a
    stale set; a folder from before the record existed is reused as it is."""
    out = Path(out_dir)
    wanted = {"cases": int(cases), "size": int(size), "seed": int(seed), "sites": int(sites)}
    record = out / PHANTOMS_RECORD
    manifest = out / "manifest.csv"
    if manifest.is_file():
        if not record.is_file():
            return manifest
        found = json.loads(record.read_text())
        if found == wanted:
            return manifest
        raise ValueError(f"{out} holds phantoms generated with {found}, not {wanted}: use another folder")
    if log is not None:
        log(f"generating {cases} phantoms ({size}^3) in {out}")
    manifest = generate_phantoms(out, cases=cases, size=size, seed=seed, sites=sites)
    record.write_text(json.dumps(wanted))
    return manifest


def phantom_batch(n: int, size: int = 32, seed: int = 0):
    """``n`` phantoms in memory (sites cycle 0, 1, 2), windowed to [0, 1] like ``raymim prepare``
    (HU -1000..1000): ``(image [n, 1, S, S, S] float32, label [n, 1, S, S, S], reports)`` as torch
    tensors, for benchmarks and tests that need the generator's crops without files.

    Example::

        image, label, reports = phantom_batch(4, size=64, seed=0)  # label == LESION on lesion voxels
    """
    import torch

    rng = np.random.default_rng(seed)
    ims, labs, reports = [], [], []
    for i in range(n):
        hu, lab, report, _ = _phantom(rng, size, i % 3)
        ims.append(np.clip((hu + 1000.0) / 2000.0, 0, 1))
        labs.append(lab)
        reports.append(report)
    return torch.tensor(np.stack(ims)).float()[:, None], torch.tensor(np.stack(labs))[:, None], reports


# The (side, organ) pairs the reports' findings name ("... in the right kidney.") -> their label.
NAMED_LABEL: dict[tuple[str, str], int] = {("right", "liver"): 2, ("right", "kidney"): 3, ("left", "kidney"): 4,
                                           ("right", "lung"): 5, ("left", "lung"): 6}
_NAMED = re.compile(r"in the (right|left) (liver|kidney|lung)")


def named_sites(report: str) -> set[tuple[str, str]]:
    """The (side, organ) pairs a phantom report's findings name."""
    return set(_NAMED.findall(report))


def named_voxels(labels, reports: list[str]):
    """Label maps [N, ...] (torch, as :func:`phantom_batch` returns them) -> bool maps of the organs + sides
    each report names, its lesions included: a lesion's voxels carry :data:`LESION`, and the report names
    every lesion placed."""
    import torch

    out = []
    for lab, rep in zip(labels, reports, strict=True):
        m = lab == LESION
        for site in named_sites(rep):
            m = m | (lab == NAMED_LABEL[site])
        out.append(m)
    return torch.stack(out)


def disjoint_reports(reports: list[str], sites: int = 3) -> list[str]:
    """For each report of :func:`phantom_batch` (sites cycle), the next report of the same site that names
    none of its organ + side pairs: a control whose words point elsewhere in the same kind of image."""
    out = []
    n = len(reports)
    for i, rep in enumerate(reports):
        own = named_sites(rep)
        js = [(i + k * sites) % n for k in range(1, n // sites + 1)]
        j = next((j for j in js if j != i and not named_sites(reports[j]) & own), None)
        if j is None:
            raise ValueError(f"no same-site report names none of {sorted(own)}; draw more phantoms.")
        out.append(reports[j])
    return out
