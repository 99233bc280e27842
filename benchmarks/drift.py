"""The drift detector on a real model: its false alarm rate on CIFAR-10 images it never
trained on, and how many unlike images it takes to raise the alarm.

    python benchmarks/drift.py --checkpoint runs/NAME/epoch_0004 --data DIR [--windows 200]

--data: a Parquet folder of CIFAR-10 images the checkpoint never trained on (say the last
file of the training folder, left out of --data when training). The model answers as Serve
answers (live_model.load: its temperature, its TTA), and drift.py compares windows of those
answers with the reference the checkpoint carries (computed from its validation split at
the end of training):

1. false alarms: --windows windows of drift.WINDOW images drawn at random from --data;
2. delay: a window full of --data's images, then unlike images 10 at a time until the
   alarm, for uniform noise, Gaussian noise, and flat colour blobs (data.make_synthetic_batch,
   "another kind of picture"); 10 repetitions each, the median number of images reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def unseen_images(data: str) -> np.ndarray:
    import pyarrow.dataset as ds

    from cifar_ray.images import decode_image

    table = ds.dataset(data, format="parquet").to_table(columns=["image"])
    return np.stack([decode_image(b) for b in table.column("image").to_pylist()])


def unlike(kind: str, n: int, rng) -> np.ndarray:
    if kind == "uniform noise":
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    if kind == "gaussian noise":
        return np.clip(rng.normal(128, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    from cifar_ray.data import make_synthetic_batch

    return make_synthetic_batch({"id": np.arange(n)}, seed=int(rng.integers(1 << 30)))["image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from cifar_ray import drift
    from cifar_ray.live_model import load

    model = load(Path(args.checkpoint), "benchmark")
    reference = model.metadata.get(drift.REFERENCE_KEY)
    if reference is None:
        sys.exit(f"{args.checkpoint} carries no drift reference (trained before drift.py)")
    images = unseen_images(args.data)
    probabilities = np.concatenate([model.predict(images[i:i + 512]) for i in range(0, len(images), 512)])
    top1, classes = probabilities.max(1), probabilities.argmax(1)
    rng = np.random.default_rng(0)
    print(f"{args.checkpoint}: reference of {reference['images']} validation images; {len(images)} unseen images")

    alarms = 0
    for _ in range(args.windows):
        pick = rng.choice(len(images), drift.WINDOW, replace=False)
        alarms += drift.compare(reference, top1[pick], classes[pick]).drifting
    print(f"false alarms: {alarms} of {args.windows} windows of {drift.WINDOW} unseen CIFAR-10 images "
          f"({alarms / args.windows:.3f}; asked: {drift.LEVEL})")

    for kind in ("uniform noise", "gaussian noise", "colour blobs"):
        delays = []
        for _ in range(args.repeats):
            watch = drift.DriftWatch()
            pick = rng.choice(len(images), drift.WINDOW, replace=False)
            watch.observe("v", top1[pick].tolist(), classes[pick].tolist())
            seen = 0
            while not watch.verdict("v", reference).drifting and seen < 5 * drift.WINDOW:
                p = model.predict(unlike(kind, 10, rng))
                watch.observe("v", p.max(1).tolist(), p.argmax(1).tolist())
                seen += 10
            delays.append(seen)
        print(f"alarm after {statistics.median(delays):.0f} images of {kind} (median of {args.repeats}; "
              f"range {min(delays)}-{max(delays)})")


if __name__ == "__main__":
    main()
