"""The eight digit tasks: input transforms and label functions of ``load_digits``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

IMAGE_SIDE = 8
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
NUM_DIGITS = 10
_SPLIT_SEED = 20240601  # fixed: every seed sees the same train/test split


class Task(NamedTuple):
    """One classification task of the testbed.

    Attributes:
      name: Short name, e.g. ``"digits_rot90"`` or ``"parity"``.
      num_classes: Number of classes :math:`C`.
      x_train: ``[n_train, 64]`` float32 flattened 8x8 images in ``[0, 1]``.
      y_train: ``[n_train]`` int32 labels in ``[0, C)``.
      x_test: ``[n_test, 64]`` float32 images.
      y_test: ``[n_test]`` int32 labels.
    """

    name: str
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _rot90(images: np.ndarray) -> np.ndarray:
    return np.rot90(images, 1, axes=(1, 2))


def _mirror(images: np.ndarray) -> np.ndarray:
    return images[:, :, ::-1]


def _invert(images: np.ndarray) -> np.ndarray:
    return 1.0 - images


def _shift(images: np.ndarray) -> np.ndarray:
    """Moves every image one pixel down and one right (zero fill)."""
    padded = np.pad(images, ((0, 0), (1, 0), (1, 0)))
    return padded[:, :IMAGE_SIDE, :IMAGE_SIDE]


def _identity(images: np.ndarray) -> np.ndarray:
    return images


def _digit(y: np.ndarray) -> np.ndarray:
    return y


def _parity(y: np.ndarray) -> np.ndarray:
    return y % 2


def _at_least_five(y: np.ndarray) -> np.ndarray:
    return (y >= 5).astype(np.int32)


def _mod3(y: np.ndarray) -> np.ndarray:
    return y % 3


def _prime(y: np.ndarray) -> np.ndarray:
    return np.isin(y, (2, 3, 5, 7)).astype(np.int32)


# (name, input transform, label function, number of classes). Four tasks read digit
# identity off transformed images (different input domains), four read a coarser label
# off the original images (same inputs, conflicting groupings).
TASK_SPECS: tuple[tuple[str, Callable, Callable, int], ...] = (
    ("digits_rot90", _rot90, _digit, 10),
    ("digits_mirror", _mirror, _digit, 10),
    ("digits_invert", _invert, _digit, 10),
    ("digits_shift", _shift, _digit, 10),
    ("parity", _identity, _parity, 2),
    ("at_least_5", _identity, _at_least_five, 2),
    ("mod_3", _identity, _mod3, 3),
    ("prime", _identity, _prime, 2),
)


@functools.lru_cache(maxsize=1)
def load_images() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's bundled digits as ``[1797, 8, 8]`` in ``[0, 1]`` and labels."""
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int32)


@functools.lru_cache(maxsize=4)
def split_indices(test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns sorted ``(train, test)`` image indices of the fixed split shared by all tasks."""
    n = load_images()[0].shape[0]
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = int(round(test_fraction * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@functools.lru_cache(maxsize=4)
def make_tasks(test_fraction: float) -> tuple[Task, ...]:
    """Builds every task of :data:`TASK_SPECS` on the fixed train/test split.

    Args:
      test_fraction: Fraction of the 1797 images held out for testing (the same images
        for every task, so pretraining on the training images never sees a test image).

    Returns:
      A tuple of :class:`Task`, one per spec, arrays read-only.
    """
    images, digits = load_images()
    train, test = split_indices(test_fraction)
    tasks = []
    for name, transform, label_fn, num_classes in TASK_SPECS:
        x = np.ascontiguousarray(transform(images), dtype=np.float32).reshape(-1, NUM_PIXELS)
        y = label_fn(digits).astype(np.int32)
        arrays = [np.ascontiguousarray(a) for a in (x[train], y[train], x[test], y[test])]
        for a in arrays:
            a.setflags(write=False)
        tasks.append(Task(name, num_classes, *arrays))
    return tuple(tasks)
