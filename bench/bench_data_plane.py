"""Training's data plane on real CTs: read + crop throughput, crops/s per core, diversity, storage.

The real CTs of ``../shared/data`` (CRLM x 2, pyradiomics lung, TotalSegmentator torso, aorta
angiography) are prepared once with the default config (1.5 x 1.5 x 2.0 mm, float16) into volume
shards; then, side by side in one run:

1. **Read + crop throughput** of the training reader (:func:`raymim.data.stream.crop_stream` ->
   ``iter_torch_batches`` with raymim's collate into ``[B, 1, 96, 96, 96]`` float32 batches, K
   crops per volume read, ``--passes`` data passes in one stream) against the baseline
   ``pyarrow.parquet.read_table`` of the same shard files the same number of times (same
   process, same machine, same page cache). Reported as volume MB/s and the ratio, with a second
   reference: the reader's own map function run in plain Ray tasks (no Ray Data), which
   separates the cost of reading + cropping from Ray Data's block transport.
2. **Crops per second per CPU core**: one thread (``torch.set_num_threads(1)``) reading volumes,
   sampling 96^3 float16 crops and augmenting them (flips, rotations, intensity) as the stream's
   Ray Data map does (:mod:`raymim.data.augment`, numpy), against the MONAI per-sample
   augmentation the training process ran before (same crops, same run); with the GPU step rates
   of bench/results/gpu_h100_2026-11-23.md it gives the cores one GPU needs.
2b. **Placement** ("placement"): the training reader end to end with the augmentation in the
   Ray Data map (after) vs un-augmented stream + MONAI augmentation in the consuming process
   (before): delivered crops/s and the consumer's busy time per crop.
3. **Diversity**: distinct crop origins per volume over 10 passes, and the fraction of each
   volume's foreground covered by the union of those crops, against the fixed-crop layout this
   replaced (K crops cut once at prepare time: the coverage of pass 0 alone).
4. **Storage per volume** on disk against the fixed-crop shards at the same dtype (K x 96^3 x 2
   bytes of image per volume, uncompressed as they were written).

Run: ``.venv/bin/python bench/bench_data_plane.py --passes 10 --out /tmp/bdp``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAYMIM_TEST_DATA", ROOT.parent / "shared" / "data"))
CASES = ["crlm/CRLM-CT-1004_ct.nii.gz", "crlm/CRLM-CT-1006_ct.nii.gz", "pyradiomics/lung1_image.nrrd",
         "totalsegmentator/example_ct.nii.gz", "totalsegmentator/aorta_ct_cropped.nii.gz"]
# bf16 samples/s per H100 at batch 32 (bench/results/gpu_h100_2026-11-23.md): MAE on 96^3 crops,
# MiM on 192^3 level-1 crops.
GPU_RATES = {"mae_96": 429.0, "mim_192": 139.0}


def prepare_real(out: Path) -> Path:
    import shutil

    from raymim.config import PrepareConfig
    from raymim.data.pipeline import prepare

    scans = out / "scans"  # a temporary copy: manifests may not point outside their folder
    scans.mkdir(parents=True, exist_ok=True)
    names = []
    for c in CASES:
        if (DATA / c).exists():
            names.append(c.replace("/", "_"))
            if not (scans / names[-1]).exists():
                shutil.copy(DATA / c, scans / names[-1])
    manifest = scans / "cases.csv"
    manifest.write_text("image\n" + "\n".join(names) + "\n")
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        summary = prepare(manifest, shards, PrepareConfig(), progress=False)
        print("prepare:", json.dumps({k: summary[k] for k in ("ok", "volumes", "voxels", "bytes", "seconds")}))
    return shards


def throughput(shards: Path, passes: int, k: int, batch: int) -> dict:
    import pyarrow.parquet as pq

    from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
    from raymim.data.shards import shard_files
    from raymim.data.stream import crop_stream, stream_spec
    from raymim.train.loop import BatchCollate

    files = shard_files(shards)
    nbytes = sum(Path(f).stat().st_size for f in files)
    cfg = RaymimConfig(prepare=PrepareConfig(crops_per_volume=k), train=TrainConfig(seed=0))
    spec = stream_spec(str(shards), cfg)
    n_vol = len(spec["items"])

    def reader(epoch: int) -> tuple[float, int]:
        t0, crops = time.perf_counter(), 0
        for b in crop_stream(spec, epoch, passes_per_epoch=passes).iter_torch_batches(
                batch_size=batch, collate_fn=BatchCollate(), prefetch_batches=2):
            assert tuple(b["image"].shape[1:]) == (1, 96, 96, 96)
            crops += b["image"].shape[0]
        return time.perf_counter() - t0, crops

    import ray

    from raymim.data.stream import crop_batch, epoch_items

    @ray.remote(num_cpus=1)
    def tasks(chunk: list[dict]) -> int:  # the reader's own map function, without Ray Data around it
        return sum(len(crop_batch({key: np.asarray([v]) for key, v in it.items()}, spec)["image"]) for it in chunk)

    reader(0)  # warm: page cache, Ray workers, imports
    t_read, crops = reader(1)
    items = epoch_items(spec, 2, 0, 1, passes)
    cpus = int(ray.cluster_resources()["CPU"])
    t0 = time.perf_counter()
    assert sum(ray.get([tasks.remote(items[i::cpus]) for i in range(cpus)])) == crops
    t_tasks = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(passes):
        for f in files:
            pq.read_table(f)
    t_raw = time.perf_counter() - t0
    mb = nbytes * passes / 1e6
    return {"volumes": n_vol, "passes": passes, "k": k, "crops": crops, "shard_mb": nbytes / 1e6,
            "reader_s": round(t_read, 3), "reader_mb_s": round(mb / t_read, 1),
            "reader_crops_s": round(crops / t_read, 1), "read_table_s": round(t_raw, 3),
            "read_table_mb_s": round(mb / t_raw, 1), "ratio": round(t_raw / t_read, 3),
            "crop_mb_s_delivered": round(crops * 96**3 * 2 / 1e6 / t_read, 1),
            "plain_tasks_s": round(t_tasks, 3), "plain_tasks_crops_s": round(crops / t_tasks, 1),
            "reader_vs_plain_tasks": round(t_tasks / t_read, 3)}


def _monai_augment():
    """The training-process augmentation this replaced (the baseline): MONAI dictionary transforms
    per sample on float32 tensors, as ``raymim.train.augment`` ran them before 2026-12-01."""
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image"]
    aug = Compose([*(RandFlipd(keys, prob=0.5, spatial_axis=a) for a in (0, 1, 2)),
                   RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
                   RandScaleIntensityd("image", factors=0.1, prob=0.5),
                   RandShiftIntensityd("image", offsets=0.1, prob=0.5)])
    aug.set_random_state(seed=0)

    def run(images):  # [B, 1, D, H, W] float32 -> the same, each sample augmented
        import torch

        out = [aug({"image": images[b]})["image"] for b in range(images.shape[0])]
        return torch.stack([o.as_tensor() if hasattr(o, "as_tensor") else o for o in out])

    return run


def per_core(shards: Path, k: int, rounds: int) -> dict:
    """One thread: read, crop, augment in numpy as the Ray Data map does (after), and the MONAI
    per-sample augmentation the training process ran (before), per 96^3 crop."""
    import torch

    from raymim.data.augment import augment_crops
    from raymim.data.crops import CropSpec, sample_crops
    from raymim.data.shards import read_volume, volume_index

    torch.set_num_threads(1)
    index = volume_index(shards)
    spec = CropSpec((96, 96, 96), k=k, seed=0)
    monai_aug = _monai_augment()
    t_read = t_crop = t_aug = t_stack = t_monai = 0.0
    n = 0
    for r in range(rounds):
        for v in index:
            t0 = time.perf_counter()
            vol = read_volume(v["file"], v["row_group"], ["case_id"])
            t1 = time.perf_counter()
            rows = sample_crops(vol, spec, r, copy=False)
            t2 = time.perf_counter()
            rows = augment_crops(rows, 0, r)
            t3 = time.perf_counter()
            stacked = np.stack([row["image"] for row in rows])  # the map's one copy (views -> batch)
            t4 = time.perf_counter()
            monai_aug(torch.from_numpy(stacked.astype(np.float32))[:, None])
            t5 = time.perf_counter()
            t_read, t_crop, t_aug = t_read + t1 - t0, t_crop + t2 - t1, t_aug + t3 - t2
            t_stack, t_monai, n = t_stack + t4 - t3, t_monai + t5 - t4, n + len(rows)
    sampler = t_read + t_crop + t_stack
    after = sampler + t_aug
    before = sampler + t_monai
    ms = {"read": t_read, "crop": t_crop, "stack": t_stack, "augment_numpy_in_map": t_aug,
          "augment_monai_in_training_process": t_monai}
    return {"crops": n, "ms_per_crop": {key: round(1e3 * t / n, 2) for key, t in ms.items()},
            "crops_s_per_core": {"sampler_only": round(n / sampler, 1),
                                 "sampler_plus_numpy_augment": round(n / after, 1),
                                 "sampler_plus_monai_augment": round(n / before, 1)},
            "augment_speedup_numpy_vs_monai": round(t_monai / max(t_aug, 1e-9), 1),
            "cores_per_gpu": {name: {"after": round(gpu * after / n, 1), "before": round(gpu * before / n, 1)}
                              for name, gpu in GPU_RATES.items() if name.endswith("96")}}


def placement(shards: Path, passes: int, k: int, batch: int) -> dict:
    """Where the augmentation runs, end to end through the training reader (Ray Data
    ``crop_stream`` -> ``iter_torch_batches``): (before) un-augmented stream, MONAI augmentation
    in the consuming (training) process per batch; (after) augmented in the stream's map, nothing
    in the consumer. Reports delivered crops/s and the consumer's own busy time per crop, the
    time the augmentation took from the training process's critical path."""
    import torch

    from raymim.config import PrepareConfig, RaymimConfig, TrainConfig
    from raymim.data.stream import crop_stream, stream_spec
    from raymim.train.loop import BatchCollate

    torch.set_num_threads(1)
    cfg = RaymimConfig(prepare=PrepareConfig(crops_per_volume=k), train=TrainConfig(seed=0))
    monai_aug = _monai_augment()
    out = {}
    for name, in_map in (("warm", True), ("before_training_process", False), ("after_ray_data_map", True)):
        spec = stream_spec(str(shards), cfg, augment=in_map)
        t0, busy, crops = time.perf_counter(), 0.0, 0
        for b in crop_stream(spec, 1, passes_per_epoch=passes).iter_torch_batches(
                batch_size=batch, collate_fn=BatchCollate(), prefetch_batches=2):
            t1 = time.perf_counter()
            img = b["image"] if in_map else monai_aug(b["image"])
            assert tuple(img.shape[1:]) == (1, 96, 96, 96)
            busy += time.perf_counter() - t1
            crops += img.shape[0]
        wall = time.perf_counter() - t0
        out[name] = {"crops": crops, "wall_s": round(wall, 3), "crops_s": round(crops / wall, 1),
                     "consumer_augment_ms_per_crop": round(1e3 * busy / crops, 3)}
    out.pop("warm")
    out["crops_s_ratio_after_vs_before"] = round(out["after_ray_data_map"]["crops_s"]
                                                 / out["before_training_process"]["crops_s"], 3)
    return out


def diversity(shards: Path, k: int, passes: int) -> dict:
    from raymim.data.crops import CropSpec, sample_crops
    from raymim.data.shards import read_volume, volume_index
    from raymim.data.transforms import is_foreground

    spec = CropSpec((96, 96, 96), k=k, seed=0)
    out = []
    for v in volume_index(shards):
        vol = read_volume(v["file"], v["row_group"], ["case_id"])
        fg = is_foreground(vol["image"])
        covered = np.zeros_like(fg)
        origins = set()
        first = None
        for p in range(passes):
            for row in sample_crops(vol, spec, p):
                o = tuple(row["origin"])
                origins.add(o)
                covered[o[0]:o[0] + 96, o[1]:o[1] + 96, o[2]:o[2] + 96] = True
            if p == 0:
                first = float((covered & fg).sum() / max(1, fg.sum()))
        out.append({"shape": v["shape"], "distinct_origins": len(origins),
                    "fg_covered": round(float((covered & fg).sum() / max(1, fg.sum())), 3),
                    "fg_covered_fixed_crops": round(first, 3)})
    return {"passes": passes, "k": k, "per_volume": out}


def storage(shards: Path, k: int) -> dict:
    from raymim.data.shards import shard_files, volume_index

    n = len(volume_index(shards))
    nbytes = sum(Path(f).stat().st_size for f in shard_files(shards))
    fixed = k * 96**3 * 2
    return {"bytes_per_volume": round(nbytes / n), "fixed_crop_image_bytes_per_volume": fixed,
            "ratio": round(nbytes / n / fixed, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/bench_data_plane")
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="passes over the volumes for the per-core rate")
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False)
    shards = prepare_real(Path(args.out))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": args.cpus,
           "load_avg": os.getloadavg(), "throughput": throughput(shards, args.passes, args.k, args.batch),
           "per_core": per_core(shards, args.k, args.rounds),
           "placement": placement(shards, args.passes, args.k, args.batch),
           "diversity": diversity(shards, args.k, args.passes),
           "storage": storage(shards, args.k)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
