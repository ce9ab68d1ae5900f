"""Reconstruction panels: layout, one shared intensity window, mask tint, orthogonal slices, row labels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from raymim.config import ModelConfig, RaymimConfig, method_config
from raymim.methods import build_method
from raymim.train.panels import orthogonal_slices, panel_figure, render_panel

VIEWS = ("axial", "coronal", "sagittal")


def _images(fig):
    """{gid: AxesImage} of every image drawn (gid ``row/kind/view``)."""
    return {im.get_gid(): im for ax in fig.axes for im in ax.images}


def _row_labels(fig) -> list[str]:
    """Y labels of the image axes (the colour bar has its own), top to bottom, one line each."""
    axes = [ax for ax in fig.axes if ax.get_ylabel() and ax.images]
    return [ax.get_ylabel().replace("\n", " ") for ax in sorted(axes, key=lambda a: -a.get_position().y0)]


def _masked_visuals(seed: int = 0, offset: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 16, 16, 16, generator=g) + offset
    mask = torch.zeros(1, 16, 16, 16)
    mask[:, :8] = 1.0  # x < 8 removed
    recon = torch.where(mask > 0, torch.rand(1, 16, 16, 16, generator=g) * 3.0, img)
    return {"input": img, "masked": img * (1 - mask), "recon": recon, "mask": mask}


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


def test_panel_png_has_one_row_per_level(tmp_path):
    vis = {f"level{i}/{k}": torch.rand(2, 1, 16, 16, 16) for i in (1, 2) for k in ("input", "masked", "recon")}
    path = render_panel(vis, tmp_path / "p.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_rows_columns_and_shared_window(close_figures):
    vis = {f"l{i}/{k}": v for i, off in ((1, 0.0), (2, 5.0)) for k, v in _masked_visuals(i, off).items()}
    fig = panel_figure(vis, title="mae step 3")
    images = _images(fig)
    bases = {gid: im for gid, im in images.items() if "/mask/" not in gid}
    # 2 rows x 3 kinds x 3 views; the mask is an overlay, not a column of its own.
    assert set(bases) == {f"l{i}/{k}/{v}" for i in (1, 2) for k in ("input", "masked", "recon") for v in VIEWS}
    lo = min(float(vis[f"l{i}/input"].min()) for i in (1, 2))
    hi = max(float(vis[f"l{i}/input"].max()) for i in (1, 2))
    clims = {im.get_clim() for im in bases.values()}
    assert len(clims) == 1, clims  # the same window for input, masked and recon of every row
    (vmin, vmax), = clims
    assert lo - 0.05 <= vmin <= lo + 0.05 and hi - 0.05 <= vmax <= hi + 0.05  # the inputs' range, not the recon's
    bars = [im.colorbar for im in bases.values() if im.colorbar is not None]
    assert len(bars) == 1 and "window" in bars[0].ax.get_ylabel()
    # Columns grouped by view, input | masked | recon within each, headed by the slice index.
    top = sorted((ax for ax in fig.axes if ax.images and ax.get_title()), key=lambda a: a.get_position().x0)
    assert [a.get_title() for a in top] == [f"{v} {c}=8\n{k}" for v, c in zip(VIEWS, "zyx", strict=True)
                                            for k in ("input", "masked", "recon")]
    assert fig.get_suptitle().startswith("mae step 3") and "x=8 y=8 z=8" in fig.get_suptitle()


def test_window_override(close_figures):
    fig = panel_figure(_masked_visuals(), window=(0.0, 2.0))
    assert {im.get_clim() for gid, im in _images(fig).items() if "/mask/" not in gid} == {(0.0, 2.0)}


def test_mask_tinted_over_the_masked_image_only(close_figures):
    vis = _masked_visuals()
    fig = panel_figure(vis)
    images = _images(fig)
    tints = {gid: im for gid, im in images.items() if "/mask/" in gid}
    assert set(tints) == {f"/mask/{v}" for v in VIEWS}
    for view in VIEWS:
        tint = tints[f"/mask/{view}"]
        assert tint.axes is images[f"/masked/{view}"].axes  # drawn over the masked image
        want, _ = orthogonal_slices(vis["mask"])[view]
        shown = np.ma.getmaskarray(tint.get_array())
        np.testing.assert_array_equal(~shown, want > 0.5)  # opaque exactly where voxels were removed
        assert 0 < tint.get_alpha() < 1
        assert len(images[f"/recon/{view}"].axes.images) == 1  # the reconstruction is not tinted
    # The axial slice fixes z: x < 8 is masked in it; the sagittal one (x = 8) sees nothing masked.
    assert np.ma.getmaskarray(tints["/mask/sagittal"].get_array()).all()
    legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend_texts == ["masked (predicted) region"]


def test_three_orthogonal_middle_slices():
    x, y, z = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), torch.arange(10.0), indexing="ij")
    vol = (100 * x + 10 * y + z)[None]  # [1, X, Y, Z]: every voxel names its coordinates
    s = orthogonal_slices(vol)
    axial, k = s["axial"]
    assert k == 5 and axial.shape == (8, 6) and axial[2, 3] == 100 * 3 + 10 * 2 + 5  # [y, x] at z = 5
    coronal, k = s["coronal"]
    assert k == 4 and coronal.shape == (10, 6) and coronal[7, 1] == 100 * 1 + 10 * 4 + 7  # [z, x] at y = 4
    sagittal, k = s["sagittal"]
    assert k == 3 and sagittal.shape == (10, 8) and sagittal[9, 2] == 100 * 3 + 10 * 2 + 9  # [z, y] at x = 3


def test_labels_case_id_and_fallbacks(close_figures):
    vis = {k: MetaTensor(v, meta={"label": "64^3 crop, resized to 16^3", "case_id": "site0/case_003"})
           for k, v in _masked_visuals().items()}
    fig = panel_figure(vis, title="simmim step 9")
    labels = _row_labels(fig)
    assert labels == ["64^3 crop, resized to 16^3"]
    assert "case site0/case_003" in fig.get_suptitle()
    plain = {k: v.as_tensor() for k, v in vis.items()}  # no meta
    fig = panel_figure(plain, case_id="given", labels=None)
    assert _row_labels(fig) == ["16x16x16 network input"]
    assert "case given" in fig.get_suptitle()
    fig = panel_figure(plain, labels={"": "what it is"})
    assert _row_labels(fig) == ["what it is"]


def _tiny(name: str, **method) -> RaymimConfig:
    model = ModelConfig(img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4,
                        decoder_hidden_size=48, decoder_layers=1, decoder_heads=4)
    return RaymimConfig(model=model, method=method_config(name, **method))


def test_mim_panel_rows_are_labelled_levels(tmp_path, close_figures):
    torch.manual_seed(0)
    # level1_scale pinned at 1: the level-1 box keeps its configured side (by default it is drawn)
    method = build_method("mim", _tiny("mim", levels=2, level_sizes=[64, 16], gamma=2, level1_scale=[1.0, 1.0]))
    out = method({"image": torch.rand(2, 1, 64, 64, 64), "case_id": ["ds/case_1", "ds/case_2"]})
    fig = panel_figure(out.visuals, title="mim step 5")
    labels = _row_labels(fig)
    # The plain input / masked / recon repeat level 1 and are drawn once.
    assert labels == ["level 1: 64^3 crop, resized to 32^3",
                      "level 2: 16^3 crop of a masked level-1 cube, resized to 32^3"]
    assert "case ds/case_1" in fig.get_suptitle()
    assert render_panel(out.visuals, tmp_path / "mim.png", title="mim step 5").stat().st_size > 1000


@pytest.mark.parametrize("name", ["mae", "simmim"])
def test_method_visuals_paste_visible_voxels_and_carry_the_mask(name: str, close_figures):
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 32, 32)
    out = build_method(name, _tiny(name))({"image": image})
    vis = out.visuals
    removed = vis["mask"] > 0.5
    assert vis["mask"].shape == (1, 32, 32, 32) and 0 < removed.float().mean() < 1
    assert torch.equal(vis["recon"][~removed], image[0][~removed])  # only removed voxels are predicted
    assert torch.equal(vis["masked"][removed], torch.zeros(int(removed.sum())))
    assert _row_labels(panel_figure(vis)) == ["32^3 crop (network input size)"]
