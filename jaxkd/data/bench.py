"""Throughput of the training input pipeline alone: ``python -m jaxkd.data.bench``.

Times ``train_batches`` over an in-memory source of random 28x28x1 uint8 images (60000, like
Fashion-MNIST) at batch 128 and prints images/second. Options: ``--batch-size``,
``--steps``, ``--shape H W C``, ``--num-examples``, ``--num-threads``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxkd.data.pipeline import ArraySource, train_batches


def measure(source, batch_size: int, steps: int, *, num_threads: int = 1, warmup: int = 20) -> float:
    """Images per second delivered by ``train_batches(source, batch_size)`` over ``steps`` batches."""
    it = train_batches(source, batch_size, seed=0, num_threads=num_threads)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape[0] == batch_size
    return steps * batch_size / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--num-examples", type=int, default=60_000)
    parser.add_argument("--shape", type=int, nargs="+", default=[28, 28, 1])
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.num_examples, *args.shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.num_examples)
    rate = measure(ArraySource(images, labels), args.batch_size, args.steps,
                   num_threads=args.num_threads)
    print(f"train_batches: {rate:,.0f} images/s (batch {args.batch_size}, shape "
          f"{tuple(args.shape)}, {args.num_examples} examples, {args.num_threads} thread(s))")


if __name__ == "__main__":
    main()
