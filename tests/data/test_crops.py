"""The crop sampler and the per-worker crop streams: fresh crops every pass, reproducible on
resume, inside the volume, above the foreground threshold, aligned with label and prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
from raymim.data.augment import apply_augmentation, augment_crops, draw_augmentation
from raymim.data.crops import PROBE_PASS, CropSpec, crop_rng, sample_crops, sample_origins
from raymim.data.stream import epoch_items
from raymim.data.transforms import is_foreground


def _volume(shape=(40, 36, 30), seed=0) -> dict:
    """A body (an ellipsoid of tissue in air) with a 'lesion' label and a patch-resolution prior."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = sum(g**2 for g in grid) < 0.7
    label = (sum((g - 0.2) ** 2 for g in grid) < 0.05).astype(np.uint8)
    image = np.where(body, 0.4 + 0.02 * rng.standard_normal(shape), 0.0) + 0.5 * label  # the lesion is bright
    image = image.astype(np.float16)
    return {"image": image, "label": label, "case_id": "0123456789abcdef0123", "domain": "d", "report": None}


def _key(rows):
    return [tuple(r["origin"]) for r in rows]


def test_passes_differ_and_a_pass_reproduces():
    vol = _volume()
    spec = CropSpec((16, 16, 16), k=4, min_foreground=0.2, seed=7)
    p0, p0_again, p1 = sample_crops(vol, spec, 0), sample_crops(vol, spec, 0), sample_crops(vol, spec, 1)
    assert _key(p0) == _key(p0_again)  # a resumed run redraws exactly these
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(p0, p0_again))
    assert _key(p0) != _key(p1)
    assert _key(sample_crops(vol, CropSpec((16, 16, 16), 4, 0.2, seed=8), 0)) != _key(p0)  # run seed counts
    seen = {o for p in range(10) for o in _key(sample_crops(vol, spec, p))}
    assert len(seen) > 30  # 10 passes x 4 crops, nearly all distinct (today's fixed crops: 4)
    assert _key(sample_crops(vol, spec, PROBE_PASS)) == _key(sample_crops(vol, spec, PROBE_PASS))


def test_crops_stay_inside_and_meet_the_foreground_threshold():
    vol = _volume()
    spec = CropSpec((16, 16, 16), k=8, min_foreground=0.5, seed=0)
    for p in range(5):
        rows = sample_crops(vol, spec, p)
        assert len(rows) == 8
        for r in rows:
            o = r["origin"]
            assert all(0 <= o[i] and o[i] + 16 <= vol["image"].shape[i] for i in range(3))
            sl = tuple(slice(o[i], o[i] + 16) for i in range(3))
            frac = float(is_foreground(vol["image"][sl]).mean())
            assert frac == pytest.approx(r["foreground"]) and frac >= 0.5
            assert np.array_equal(r["image"], vol["image"][sl]) and np.array_equal(r["label"], vol["label"][sl])
    # smaller than the crop: zero-padded, still K crops
    small = dict(vol, image=vol["image"][:10], label=vol["label"][:10])
    assert all(r["image"].shape == (16, 16, 16) for r in sample_crops(small, spec, 0))


def test_pos_neg_sampling_centres_crops_on_the_label():
    vol = _volume()
    rng = crop_rng(0, 0, vol["case_id"])
    pos = sample_origins(vol["image"], CropSpec((8, 8, 8), k=20, pos_fraction=1.0), rng, vol["label"])
    assert all(vol["label"][o[0]:o[0] + 8, o[1]:o[1] + 8, o[2]:o[2] + 8].any() for o, _ in pos)
    neg = sample_origins(vol["image"], CropSpec((8, 8, 8), k=40, pos_fraction=0.0), rng, vol["label"])
    centre_labels = [vol["label"][o[0] + 4, o[1] + 4, o[2] + 4] for o, _ in neg]
    assert sum(centre_labels) == 0


def test_prior_crops_are_patch_aligned_subgrids():
    vol = _volume((40, 36, 32))
    p = 4
    # a prior that is a function of position: the patch's flat index, so any misalignment shows
    grid = np.arange(10 * 9 * 8, dtype=np.float32).reshape(10, 9, 8)
    vol["lesion_prob"] = grid
    spec = CropSpec((16, 16, 16), k=6, align=p, seed=3)
    for r in sample_crops(vol, spec, 2):
        o = r["origin"]
        assert all(v % p == 0 for v in o)
        assert np.array_equal(r["lesion_prob"], grid[o[0] // p:o[0] // p + 4, o[1] // p:o[1] // p + 4,
                                                       o[2] // p:o[2] // p + 4])


def test_augmentation_moves_image_label_and_prior_together():
    """After random flips / rotations the prior still equals the patch-wise label fraction."""
    vol = _volume((32, 32, 32))
    p = 4
    frac = vol["label"].reshape(8, p, 8, p, 8, p).mean(axis=(1, 3, 5)).astype(np.float32)
    vol["lesion_prob"] = frac
    rows = sample_crops(vol, CropSpec((16, 16, 16), k=4, align=p, pos_fraction=0.5, seed=1), 0)
    changed = 0
    for pass_index in range(6):
        for row, out in zip(rows, augment_crops(rows, 1, pass_index, record=True), strict=True):
            lab = out["label"].astype(np.float32)
            expect = lab.reshape(4, p, 4, p, 4, p).mean(axis=(1, 3, 5))
            np.testing.assert_allclose(out["lesion_prob"], expect)
            n = int(lab.sum())
            if n:  # the label's voxels are still exactly the brightest ones
                top = np.argsort(-out["image"].astype(np.float32).ravel(), kind="stable")[:n]
                assert lab.ravel()[top].all()
            assert out["image"].dtype == np.float16 and out["image"].shape == (16, 16, 16)
            changed += int(not np.array_equal(out["label"], row["label"]))
    assert changed > 0  # the spatial transforms did act


def test_augmentation_follows_monai_transforms_and_probabilities():
    """The numpy transforms equal MONAI's Flip / Rotate90 / ScaleIntensity / ShiftIntensity for
    the drawn parameters, and the parameters follow MONAI's probabilities and ranges."""
    from monai.transforms import Flip, Rotate90, ScaleIntensity, ShiftIntensity

    x = np.random.default_rng(0).random((12, 12, 10)).astype(np.float32)
    draws = [draw_augmentation(np.random.default_rng(i), x.shape) for i in range(400)]
    for aug in draws[:20]:
        ours = apply_augmentation({"image": x}, aug)["image"]
        ref = torch.from_numpy(x)[None]
        if aug.flips:
            ref = Flip(spatial_axis=list(aug.flips))(ref)
        if aug.rot90:
            ref = Rotate90(k=aug.rot90, spatial_axes=(0, 1))(ref)
        ref = ShiftIntensity(aug.shift)(ScaleIntensity(minv=None, maxv=None, factor=aug.scale - 1.0)(ref))
        np.testing.assert_allclose(ours, np.asarray(ref)[0], rtol=1e-6, atol=1e-6)
    for axis in range(3):
        assert 0.4 < np.mean([axis in a.flips for a in draws]) < 0.6
    assert 0.4 < np.mean([a.rot90 > 0 for a in draws]) < 0.6 and {a.rot90 for a in draws} == {0, 1, 2, 3}
    scales = np.array([a.scale for a in draws if a.scale != 1.0])
    shifts = np.array([a.shift for a in draws if a.shift != 0.0])
    assert 0.4 < len(scales) / 400 < 0.6 and 0.4 < len(shifts) / 400 < 0.6
    assert scales.min() >= 0.9 and scales.max() <= 1.1 and abs(shifts).max() <= 0.1
    assert all(a.rot90 == 0 for a in (draw_augmentation(np.random.default_rng(i), (16, 12, 16)) for i in range(50)))


def test_augmentation_depends_on_seed_pass_case_and_crop_index_only():
    vol = _volume((32, 32, 32))
    rows = sample_crops(vol, CropSpec((16, 16, 16), k=4, seed=2), 3)
    a = augment_crops(rows, 2, 3, record=True)
    b = augment_crops([dict(r) for r in rows], 2, 3, record=True)  # a resumed run, another worker
    assert all(np.array_equal(x["image"], y["image"]) and x["augment"] == y["augment"] for x, y in zip(a, b))
    assert [r["augment"] for r in augment_crops(rows[1:], 2, 3, record=True)] != [r["augment"] for r in a[1:]]
    assert [r["augment"] for r in augment_crops(rows, 2, 4, record=True)] != [r["augment"] for r in a]
    assert [r["augment"] for r in augment_crops(rows, 9, 3, record=True)] != [r["augment"] for r in a]
    assert len({str(r["augment"]) for r in a}) > 1  # crops of one volume are augmented independently


def test_real_ct_lung_stays_lung_like_after_resampling_cropping_and_augmentation(shared_data):
    """The TotalSegmentator example CT at the default 1.5 x 1.5 x 2.0 mm: crops centred on the
    lungs (labels 10-14, positive sampling) keep a lung-like mean inside the lung label after
    flips / rotations, and the rest of the body in the crop stays far denser."""
    from raymim.data.worker import preprocess_case

    ts = shared_data / "totalsegmentator"
    cfg = PrepareConfig(crop_size=[32, 32, 32])
    pre = preprocess_case({"image": str(ts / "example_ct.nii.gz"),
                           "label": str(ts / "example_seg_fast_force_split.nii.gz")}, cfg, "test")
    assert pre["spacing"] == pytest.approx([1.5, 1.5, 2.0])
    lung_label = np.isin(pre["label"], [10, 11, 12, 13, 14]).astype(np.uint8)
    vol = {"image": pre["image"].astype(np.float16), "label": lung_label, "case_id": "ab" * 10}
    rows = sample_crops(vol, CropSpec((32, 32, 32), k=6, pos_fraction=1.0, seed=0), 0)
    out = augment_crops(rows, 0, 0)
    assert any(not np.array_equal(o["label"], r["label"]) for o, r in zip(out, rows))  # the augmentation moved things
    hu = np.stack([o["image"] for o in out]).astype(np.float32) * 2000.0 - 1000.0  # intensity jitter is +-10 %
    lung = np.stack([o["label"] for o in out]) > 0
    tissue = (~lung) & (hu > -500)
    assert lung.sum() > 500
    assert float(hu[lung].mean()) < -450  # raw CT: about -760 HU inside these labels
    assert float(hu[tissue].mean()) > float(hu[lung].mean()) + 400


def test_epoch_items_are_disjoint_equal_and_change_order_per_pass():
    spec = {"items": [{"file": "f", "row_group": i} for i in range(11)], "seed": 0}
    parts = [epoch_items(spec, 0, r, 3, passes_per_epoch=2) for r in range(3)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == 22 // 3
    keys = [(it["pass"], it["row_group"]) for p in parts for it in p]
    assert len(keys) == len(set(keys))
    assert {it["pass"] for it in parts[0]} == {0, 1}
    assert parts == [epoch_items(spec, 0, r, 3, passes_per_epoch=2) for r in range(3)]  # deterministic
    assert epoch_items(spec, 1, 0, 3, 2) != parts[0] and {it["pass"] for it in epoch_items(spec, 1, 0, 3, 2)} == {2, 3}


@pytest.mark.ray
def test_crop_stream_fresh_per_pass_and_reproducible(ray_session, phantoms, tmp_path, monkeypatch):
    """Two passes over the same shards give different crops of the same volumes; rebuilding a
    pass (what a resumed worker does) gives the same rows in the same order."""
    from raymim.data.pipeline import prepare
    from raymim.data.stream import crop_stream, stream_spec

    monkeypatch.setenv("RAYMIM_DEID_KEY", "test-key")
    prep = PrepareConfig(crop_size=[16, 16, 16], crops_per_volume=2)
    prepare(phantoms, tmp_path / "out", prep, progress=False)
    spec = stream_spec(str(tmp_path / "out"), RaymimConfig(prepare=prep, train=TrainConfig(steps=2, seed=5)))

    def rows(epoch, rank=0, world=1, images=False):
        got = crop_stream(spec, epoch, rank, world).take_all()
        return [(r["case_id"], int(r["pass"]), tuple(r["origin"])) + ((r["image"].tobytes(),) if images else ())
                for r in got]

    first, again, second = rows(0, images=True), rows(0, images=True), rows(1)
    assert first == again  # same rows, same order, same augmented images
    # the stream's crops are the sampler's crops augmented with their (seed, pass, case, index) draws
    from raymim.data.stream import volume_crops

    local = volume_crops(epoch_items(spec, 0, 0, 1)[0], spec)
    assert [r["image"].tobytes() for r in local] == [f[3] for f in first[:2]]
    plain = volume_crops(epoch_items(spec, 0, 0, 1)[0], dict(spec, crop=dict(spec["crop"], augment=False)))
    assert any(p["image"].tobytes() != f[3] for p, f in zip(plain, first[:2]))
    first = [f[:3] for f in first]
    assert len(first) == len(second) == 12
    by_case = {}
    for cid, p, o in first + second:
        by_case.setdefault(cid, {}).setdefault(p, set()).add(o)
    assert len(by_case) == 6 and all(v[0] != v[1] for v in by_case.values())
    halves = [rows(0, r, 2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == 6 and not {c for c, *_ in halves[0]} & {c for c, *_ in halves[1]}

    # the probe: fixed crops of whole held-out volumes, left out of the training stream
    from raymim.train.trainer import build_dataset, build_probe

    cfg = RaymimConfig(prepare=prep, train=TrainConfig(steps=2, seed=5, probe_crops=3))
    probe, held = build_probe(str(tmp_path / "out"), cfg)
    again, _ = build_probe(str(tmp_path / "out"), cfg)
    assert probe.shape == (3, 16, 16, 16) and np.array_equal(probe, again) and len(held) == 2
    spec_train, _ = build_dataset(str(tmp_path / "out"), cfg, exclude=held)
    assert len(spec_train["items"]) == 4
    trained = {r["case_id"] for r in crop_stream(spec_train, 0).take_all()}
    assert len(trained) == 4 and not trained & set(held)


def test_mim_levels_come_out_at_the_reference_sizes():
    """A 192^3 train-time crop (mim.yaml) with the default level sizes: boxes of 192, 96 and 16
    voxels of the stored grid, each resized to the 96^3 network input."""
    from raymim.masking.multilevel import mim_levels
    from raymim.methods.mim import MiMConfig

    vol = _volume((200, 196, 150))  # shorter than 192 along z: padded by the sampler
    (row,) = sample_crops(vol, CropSpec((192, 192, 192), k=1, seed=0), 0)
    assert row["image"].shape == (192, 192, 192)
    image = torch.from_numpy(row["image"].astype(np.float32))[None, None]
    levels = mim_levels(image, 96, 16, MiMConfig().level_sizes, 0.6, 2, generator=torch.Generator().manual_seed(0))
    sides = [{int(b[3] - b[0]) for b in lv.boxes.reshape(-1, 6)} for lv in levels]
    assert sides == [{192}, {96}, {16}]
    assert all(tuple(lv.volumes.shape[2:]) == (96, 96, 96) for lv in levels)


def test_config_crop_fields_validated_and_old_keys_refused():
    from raymim.config import ConfigError, load_config

    assert PrepareConfig().spacing == [1.5, 1.5, 2.0]
    assert load_config(None, ["prepare.spacing=null"]).prepare.spacing is None  # the native grid
    with pytest.raises(ConfigError, match="crop_mode"):
        load_config(None, ["prepare.crop_mode=grid"])  # fixed prepare-time crops are gone
    with pytest.raises(ValueError, match="crop_pos_fraction"):
        PrepareConfig(crop_pos_fraction=1.5)


def test_positional_methods_get_no_spatial_augmentation(phantoms):
    """MedIM's word maps are fixed over the patch grid: its crops are never flipped or rotated,
    while every other method's are."""
    from pathlib import Path

    from raymim.config import load_config
    from raymim.data.stream import stream_spec

    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    specs = {m: stream_spec(str(phantoms), load_config(configs / f"{m}-tiny.yaml")) for m in ("mae", "medim")}
    assert specs["mae"]["crop"]["spatial"] and not specs["medim"]["crop"]["spatial"]
    draws = [draw_augmentation(np.random.default_rng(s), (8, 8, 8), spatial=False) for s in range(50)]
    assert all(d.flips == () and d.rot90 == 0 for d in draws)
    assert any(d.scale != 1.0 or d.shift != 0.0 for d in draws)
    spatial = [draw_augmentation(np.random.default_rng(s), (8, 8, 8)) for s in range(50)]
    assert any(d.flips for d in spatial) and any(d.rot90 for d in spatial)
