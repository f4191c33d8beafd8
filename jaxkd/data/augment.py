"""On-device augmentation and normalisation: pure, jittable functions of batched images.

Images are ``(B, H, W, C)``. Run these inside the jitted train step (``pad`` and ``flip`` are
static Python values).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def crop_flip_params(rng: jax.Array, batch_size: int, *, pad: int,
                     flip: bool) -> tuple[jax.Array, jax.Array]:
    """The random choices :func:`random_crop_flip` makes for ``rng``.

    Returns ``(offsets int32 (B, 2), flips bool (B,))``: the top-left corner (row, col) of each
    crop in the padded image (each in ``[0, 2 * pad]``) and whether it is mirrored.
    """
    crop_rng, flip_rng = jax.random.split(rng)
    offsets = jax.random.randint(crop_rng, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    if flip:
        flips = jax.random.bernoulli(flip_rng, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), dtype=bool)
    return offsets, flips


def random_crop_flip(rng: jax.Array, images: jax.Array, *, pad: int, flip: bool) -> jax.Array:
    """Per-example random crop after zero-padding by ``pad``, then a random horizontal flip.

    Output has the shape and dtype of ``images``; with ``pad=0`` and ``flip=False`` it is
    ``images`` unchanged.
    """
    if images.ndim != 4:
        raise ValueError(f"random_crop_flip expects (B, H, W, C) images, got shape {images.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return images
    offsets, flips = crop_flip_params(rng, images.shape[0], pad=pad, flip=flip)
    return apply_crop_flip(images, offsets, flips, pad=pad, flip=flip)


def apply_crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *, pad: int,
                    flip: bool) -> jax.Array:
    """The crop and flip of :func:`random_crop_flip` with given choices instead of random ones.

    ``offsets`` int (B, 2): top-left (row, col) of each crop in the image zero-padded by ``pad``
    (each in ``[0, 2 * pad]``); ``flips`` bool (B,): mirror horizontally after the crop (only
    used when ``flip``). Used for stored augmented views (the teacher cache's), so that the
    student sees exactly the view the teacher's logits were computed on.
    """
    if images.ndim != 4:
        raise ValueError(f"apply_crop_flip expects (B, H, W, C) images, got shape {images.shape}")
    b, h, w, c = images.shape
    if pad:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(image, offset):
            zero = jnp.zeros((), offset.dtype)
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], zero), (h, w, c))

        images = jax.vmap(crop)(padded, jnp.asarray(offsets, jnp.int32))
    if flip:
        images = jnp.where(jnp.asarray(flips, bool)[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x - mean) / std`` per channel (last axis), as float32.

    ``uint8`` images are first scaled to [0, 1] (``/ 255``); float images are used as they are.
    Any other integer dtype holds token ids (a sequence data set, ``DatasetInfo.image_dtype ==
    "int32"``): they are returned unchanged, as int32, and ``mean``/``std`` are not used.
    """
    x = jnp.asarray(images)
    if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint8:
        return x.astype(jnp.int32)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    else:
        x = x.astype(jnp.float32)
    mean = jnp.asarray(mean, dtype=jnp.float32)
    std = jnp.asarray(std, dtype=jnp.float32)
    return (x - mean) / std


def default_augmentation(name: str) -> dict:
    """Default ``dict(pad=..., flip=...)`` for a data set name (config/version ignored).

    * CIFAR-10/100: pad 4 + horizontal flip (the standard recipe).
    * everything else (Fashion-MNIST, digits, MNIST-1D, ...): none. For Fashion-MNIST,
      ``dict(pad=2, flip=False)`` is a reasonable opt-in.
    """
    base = name.split("/")[0].split(":")[0]
    if base.startswith("cifar"):
        return dict(pad=4, flip=True)
    return dict(pad=0, flip=False)
