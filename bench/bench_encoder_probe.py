"""Linear probe of an encoder's tokens: does a pretrained encoder carry more segmentation-relevant
information than the same architecture at random init?

The diagnostic ``raymim evidence`` points to when pretrained and scratch fine-tuning end level
(issue #23: "find out why ... with one diagnostic each, for example a linear probe"). Fine-tuning
mixes the encoder with a decoder that also sees the raw image through UNETR's convolutional skip,
so a level fine-tune cannot tell "the encoder learnt nothing" from "the decoder did not need it".
This probe looks at the encoder alone:

1. the labelled cases are preprocessed exactly as ``raymim finetune`` does
   (:func:`raymim.downstream.data.load_labelled_cases`, ROI = ``model.img_size``);
2. each case is tiled into non-overlapping ROI crops; every crop goes through the encoder (all
   tokens visible, no masking; eval mode) and each token gets the feature of the encoder's last
   layer (after its final norm), the label that covers most voxels of its patch, and whether
   any voxel of the patch is lesion;
3. a multinomial logistic regression (scikit-learn) predicts the token labels from the features,
   cross-validated with the cases as groups (``GroupKFold``), so no case is in both the fitted
   and the scored fold. Reported: balanced accuracy and macro F1 over the classes present, and
   the same for "patch contains lesion" (binary, the class MPS-AMS is about; lesions are
   rarely the majority of a patch).

The baseline, in the same run: the identical architecture at ``torch.manual_seed(seed)`` init
(what the scratch twin starts from). ``--crop-scale 2`` probes at the pretraining view of the
tiny configs instead (2x ROI crops resized to the ROI, as ``prepare.crop_size`` 64 with
``model.img_size`` 32 does), to tell a scale mismatch between pretraining and fine-tuning from a
weak encoder.

Run (the task phantoms and checkpoints of a ``raymim evidence`` working folder)::

    .venv/bin/python bench/bench_encoder_probe.py --data raymim-evidence/task/manifest.csv \\
        --checkpoint raymim-evidence/ray/evidence-mae/best [--checkpoint ...] [--crop-scale 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def token_dataset(encoder: torch.nn.Module, cases, roi: int, patch: int, classes: int, lesion: int,
                  crop_scale: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(features [N, C], majority labels [N], has-lesion [N], groups [N])`` of every token of every
    tile of every case."""
    feats, labels, lesions, groups = [], [], [], []
    side = roi * crop_scale
    encoder.eval()
    for ci, case in enumerate(cases):
        img, lab = case["image"].float(), case["label"].long()  # [1, X, Y, Z]
        pad = [max(0, side - s) for s in img.shape[1:]]
        if any(pad):
            spec = [v for p in reversed(pad) for v in (0, p)]
            img, lab = F.pad(img, spec), F.pad(lab, spec)
        xs = [range(0, s - side + 1, side) for s in img.shape[1:]]
        for x in xs[0]:
            for y in xs[1]:
                for z in xs[2]:
                    crop = img[:, x:x + side, y:y + side, z:z + side][None]
                    lcrop = lab[:, x:x + side, y:y + side, z:z + side][None].float()
                    if crop_scale != 1:
                        crop = F.interpolate(crop, size=(roi,) * 3, mode="trilinear", align_corners=False)
                        lcrop = F.interpolate(lcrop, size=(roi,) * 3, mode="nearest")
                    with torch.no_grad():
                        tokens, _ = encoder(crop)
                    g = roi // patch
                    onehot = F.one_hot(lcrop[0, 0].long(), classes).permute(3, 0, 1, 2).float()
                    share = F.avg_pool3d(onehot[None], patch)[0].reshape(classes, g ** 3).T  # [L, K]
                    feats.append(tokens[0].float().numpy())
                    labels.append(share.argmax(1).numpy())
                    lesions.append((share[:, lesion] > 0).numpy().astype(int) if lesion < classes
                                   else np.zeros(g ** 3, dtype=int))
                    groups.append(np.full(g ** 3, ci))
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(lesions), np.concatenate(groups)


def probe_scores(x: np.ndarray, y: np.ndarray, has_lesion: np.ndarray, groups: np.ndarray,
                 folds: int = 5) -> dict[str, float]:
    """Case-grouped cross-validated logistic regression on the tokens."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: dict[str, float] = {}
    for name, target in (("organs", y), ("lesion", has_lesion)):
        pred = np.zeros_like(target)
        for fit, score in GroupKFold(n_splits=min(folds, len(set(groups)))).split(x, target, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
            if len(set(target[fit])) < 2:
                pred[score] = target[fit][0]
                continue
            model.fit(x[fit], target[fit])
            pred[score] = model.predict(x[score])
        out[f"{name}_balanced_acc"] = float(balanced_accuracy_score(target, pred))
        out[f"{name}_macro_f1"] = float(f1_score(target, pred, average="macro"))
    out["tokens"] = int(len(y))
    out["lesion_tokens"] = int(has_lesion.sum())
    return out


def main(argv: list[str] | None = None) -> int:
    from raymim.data.synth import LESION
    from raymim.downstream.data import load_labelled_cases
    from raymim.models import build_encoder
    from raymim.weights import load_pretrained

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled cases (a folder, manifest or dataset.json)")
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint dir (repeatable)")
    p.add_argument("--crop-scale", type=int, default=1, help="tile side = ROI x this, resized to the ROI")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    p.add_argument("--out", default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    cases = None
    for ck in args.checkpoint:
        state, cfg = load_pretrained(ck)
        roi, patch = cfg.model.img_size, cfg.model.patch_size
        if cases is None:
            cases, _ = load_labelled_cases(args.data, cfg.prepare, None, [roi] * 3)
            classes = int(max(int(c["label"].max()) for c in cases)) + 1
        for init in ("random", "pretrained"):
            torch.manual_seed(args.seed)
            enc = build_encoder(cfg.model)
            if init == "pretrained":
                missing, unexpected = enc.load_state_dict(state, strict=False)
                if missing:
                    raise SystemExit(f"{ck}: encoder keys missing from the checkpoint: {missing[:5]}")
            x, y, les, g = token_dataset(enc, cases, roi, patch, classes, LESION, args.crop_scale)
            row = {"checkpoint": str(ck), "method": cfg.method.name, "init": init, "crop_scale": args.crop_scale,
                   "cases": len(cases), **probe_scores(x, y, les, g)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
