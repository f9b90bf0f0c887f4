"""Augmented training samples per second (the recipe's albumentations pipeline on real frames),
alone and through the batched GeneratorDataset, and how long a training loop would wait for data.

    .venv/bin/python benchmarks/data_pipeline.py --preset seed --data-dir ../shared/data/isbi2012
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common

import cv2
import tifffile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--step-seconds", type=float, default=0.0,
                   help="simulated training step time; report how long each batch was waited for")
    args = p.parse_args()

    from unet.data import SegmentationSource, create_dataset, train_transforms
    from unet.recipes import get_preset

    recipe = get_preset(args.preset)
    vol = tifffile.imread(Path(args.data_dir) / "train-volume.tif")
    lab = tifffile.imread(Path(args.data_dir) / "train-labels.tif")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for i in range(len(vol)):
            img, msk = Path(tmp) / f"{i:05d}.png", Path(tmp) / f"{i:05d}_m.png"
            cv2.imwrite(str(img), vol[i])
            cv2.imwrite(str(msk), lab[i])
            pairs.append((img, msk))
        source = SegmentationSource(pairs, train_transforms(recipe), recipe.in_channels, length=args.samples)
        t0 = time.perf_counter()
        for i in range(args.samples):
            source[i]
        single = args.samples / (time.perf_counter() - t0)
        dataset = create_dataset(source, recipe.batch_size, shuffle=True, num_workers=recipe.num_workers,
                                 drop_remainder=True)
        waits, t_prev = [], time.perf_counter()
        t0 = t_prev
        for _ in dataset.create_tuple_iterator(num_epochs=1):
            now = time.perf_counter()
            waits.append(now - t_prev)
            time.sleep(args.step_seconds)  # the training step the loader overlaps with
            t_prev = time.perf_counter()
        total = time.perf_counter() - t0
    batches = len(waits)
    common.emit({"benchmark": "data_pipeline", "preset": args.preset, "samples": args.samples,
                 "workers": recipe.num_workers, "samples_per_s_one_thread": round(single, 1),
                 "samples_per_s_dataset": round(batches * recipe.batch_size / (total - batches * args.step_seconds), 1),
                 "simulated_step_s": args.step_seconds,
                 "mean_wait_per_batch_s": round(sum(waits[1:]) / max(1, batches - 1), 4),
                 "max_wait_per_batch_s": round(max(waits[1:] or [0]), 4)})


if __name__ == "__main__":
    main()
