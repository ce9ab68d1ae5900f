"""The readers never hang, never allocate what a header merely claims, never read outside the
input, and say in plain words what is wrong with complex, RGB or degenerate images."""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from raymim.io.checks import CaseRejected, NotRegularFile
from raymim.io.deid import content_digest
from raymim.io.readers import VolumeReader


def _load(path, **kw) -> np.ndarray:
    reader = VolumeReader(**kw)
    return reader.get_data(reader.read(str(path)))[0]


def _rejected(path, **kw) -> str:
    with pytest.raises(CaseRejected) as info:
        _load(path, **kw)
    reason = str(info.value)
    assert str(Path(path).parent) not in reason and "\n" not in reason
    return reason


def _bounded(fn, seconds: float = 20.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) when it blocks."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked"
    return out


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_fifo_device_and_dev_zero_symlink_rejected_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.nii.gz")
    os.symlink("/dev/zero", tmp_path / "zero.nii.gz")
    os.symlink("/dev/null", tmp_path / "null.nrrd")
    for name, kind in (("fifo.nii.gz", "FIFO"), ("zero.nii.gz", "character device"), ("null.nrrd", "device")):
        out = _bounded(lambda n=name: _load(tmp_path / n))
        assert isinstance(out.get("error"), CaseRejected) and kind in str(out["error"]), name
        # hashing (the case id) refuses them too, as an OSError the pipeline already catches
        out = _bounded(lambda n=name: content_digest(tmp_path / n))
        assert isinstance(out.get("error"), NotRegularFile) and isinstance(out["error"], OSError), name


def test_crafted_header_rejected_before_allocating(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((2048, 2048, 256))
    raw = hdr.binaryblock + b"\x00" * 4 + bytes(1300)
    (tmp_path / "crafted.nii").write_bytes(raw)
    with gzip.open(tmp_path / "crafted.nii.gz", "wb") as f:
        f.write(raw)
    assert (tmp_path / "crafted.nii.gz").stat().st_size < 2048
    import tracemalloc

    tracemalloc.start()
    reasons = [_rejected(tmp_path / "crafted.nii"), _rejected(tmp_path / "crafted.nii.gz")]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20  # nothing near the 2 GB the header claims
    assert "truncated" in reasons[0] and "far more data than the compressed file can hold" in reasons[1]


def test_voxel_limit_is_configurable(tmp_path):
    path = _nifti(tmp_path / "ok.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    assert _load(path).shape == (20, 20, 20)
    assert "exceeds the limit" in _rejected(path, max_voxels=1000)
    from raymim.config import PrepareConfig

    assert PrepareConfig().max_voxels == 1 << 30
    with pytest.raises(ValueError, match="max_voxels"):
        PrepareConfig(max_voxels=0)


def _nhdr(folder: Path, data_file: str, sizes=(8, 8, 8)) -> Path:
    text = (f"NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\nsizes: {' '.join(map(str, sizes))}\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\n"
            f"encoding: raw\ndata file: {data_file}\n")
    path = folder / "x.nhdr"
    path.write_text(text)
    return path


def test_detached_nrrd_data_file_must_stay_in_its_folder(tmp_path):
    inner = tmp_path / "root" / "case"
    inner.mkdir(parents=True)
    vol = np.random.default_rng(0).integers(0, 1000, (8, 8, 8), dtype=np.int16)
    (inner / "x.raw").write_bytes(vol.tobytes(order="F"))
    assert np.array_equal(_load(_nhdr(inner, "x.raw")), vol.astype(np.float32))  # a legit detached pair
    (tmp_path / "root" / "secret.raw").write_bytes(vol.tobytes())
    for target in ("../secret.raw", str(tmp_path / "root" / "secret.raw"), "/etc/passwd", "/dev/zero"):
        reason = _rejected(_nhdr(inner, target))
        assert "outside the header's folder" in reason and "passwd" not in reason
    os.symlink("/dev/zero", inner / "z.raw")
    assert "outside the header's folder" in _rejected(_nhdr(inner, "z.raw"))
    (inner / "short.raw").write_bytes(b"\x00" * 100)
    assert "truncated" in _rejected(_nhdr(inner, "short.raw"))


def test_gzip_nrrd_never_decompressed_past_its_declared_size(tmp_path):
    import nrrd

    vol = np.random.default_rng(0).integers(0, 100, (8, 8, 8), dtype=np.int16)
    nrrd.write(str(tmp_path / "plain.nrrd"), vol, {"encoding": "gzip"})
    assert "orientation is unknown" in _rejected(tmp_path / "plain.nrrd")  # not MONAI's KeyError
    nrrd.write(str(tmp_path / "ok.nrrd"), vol, {"encoding": "gzip", "space": "left-posterior-superior",
                                                 "space directions": np.eye(3), "space origin": np.zeros(3)})
    assert _load(tmp_path / "ok.nrrd").shape == (8, 8, 8)
    header = (tmp_path / "ok.nrrd").read_bytes().split(b"\n\n", 1)[0] + b"\n\n"
    (tmp_path / "bomb.nrrd").write_bytes(header + gzip.compress(bytes(64 << 20)))  # 64 MB of zeros
    assert "longer than the header declares" in _rejected(tmp_path / "bomb.nrrd")
    (tmp_path / "short.nrrd").write_bytes(header + gzip.compress(vol.tobytes()[:500]))
    assert "truncated" in _rejected(tmp_path / "short.nrrd")
    # Decoded here (one bounded pass), the voxels are pynrrd's.
    assert np.array_equal(_load(tmp_path / "ok.nrrd"), nrrd.read(str(tmp_path / "ok.nrrd"))[0].astype(np.float32))


def test_complex_and_rgb_voxels_rejected(tmp_path):
    rng = np.random.default_rng(0)
    cplx = _nifti(tmp_path / "c.nii.gz", (rng.normal(size=(8, 8, 8)) + 1j).astype(np.complex64))
    assert "complex" in _rejected(cplx)
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rng.integers(0, 255, (8, 8, 8))
    assert "RGB" in _rejected(_nifti(tmp_path / "rgb.nii.gz", rgb))


@pytest.mark.parametrize("case,expected", [
    ("zero_pixdim", "spacing is zero"),
    ("nan_pixdim", "not a number"),
    ("singular", "not independent"),
    ("nan_affine", "NaN"),
])
def test_degenerate_affines_have_plain_reasons(tmp_path, case, expected):
    data = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    path = tmp_path / f"{case}.nii"
    if case in ("singular", "nan_affine"):
        aff = np.eye(4)
        if case == "singular":  # second and third voxel axes point the same way
            aff[:3, 2] = [0.0, 1.0, 0.0]
        img.set_sform(aff, code=2)
        img.set_qform(None, code=0)
        nib.save(img, path)
        if case == "nan_affine":  # srow_x[0] (offset 280) as a broken writer leaves it
            raw = bytearray(path.read_bytes())
            raw[280:284] = np.float32(np.nan).tobytes()
            path.write_bytes(bytes(raw))
    else:  # patch the header as a broken writer leaves it: pixdim[2] (offset 84), no qform / sform
        nib.save(img, path)
        raw = bytearray(path.read_bytes())
        raw[84:88] = np.float32(0.0 if case == "zero_pixdim" else np.nan).tobytes()
        raw[252:256] = np.zeros(2, np.int16).tobytes()
        path.write_bytes(bytes(raw))
    reason = _rejected(path)
    assert expected in reason and "SVD" not in reason


def test_detached_nrrd_pairs_with_equal_headers_are_different_scans(tmp_path):
    """The header of a detached NRRD names its data file by a relative name: two scans of one
    geometry exported alike have byte-identical headers. The content id hashes the data file
    too, so both are kept; a true copy of a pair is still a duplicate."""
    from raymim.io.discover import discover

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "root" / name).mkdir(parents=True)
        _nhdr(tmp_path / "root" / name, "x.raw")
    first = rng.integers(0, 1000, (8, 8, 8), dtype=np.int16).tobytes(order="F")
    (tmp_path / "root" / "a" / "x.raw").write_bytes(first)
    (tmp_path / "root" / "b" / "x.raw").write_bytes(rng.integers(0, 1000, (8, 8, 8), dtype=np.int16).tobytes(order="F"))
    (tmp_path / "root" / "c" / "x.raw").write_bytes(first)  # a copy of a
    found = discover(tmp_path / "root")
    kept = sorted(Path(c["image"]).parent.name for c in found.cases)
    assert kept == ["a", "b"], (kept, found.duplicates)
    assert [Path(d["path"]).parent.name for d in found.duplicates] == ["c"]
