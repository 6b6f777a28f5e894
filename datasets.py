"""Training data: Moving MNIST, procedural moving digits, the resumable sampler and the real pyramid.

Every dataset here returns clips ``(C, T, H, W)`` as float32 in ``[-1, 1]`` and is indexed by
``(index, sample_seed)`` pairs from :class:`ResumableBatchSampler`: all of a sample's randomness
(window start, crop, flip, digit motion) comes from ``sample_seed``, so a run resumed at
iteration ``i`` sees exactly the batches an uninterrupted run would, whatever the worker count.
"""

import os
import sys
import urllib.request
import warnings
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from models import subsample

MOVING_MNIST_URL = "http://www.cs.toronto.edu/~nitish/unsupervised_video/mnist_test_seq.npy"

Key = Union[int, Tuple[int, int]]


def split_key(key: Key) -> Tuple[int, np.random.Generator]:
    """``(index, sample_seed)`` (or a bare index, seeded by itself) -> ``(index, rng)``."""
    if isinstance(key, (tuple, list)):
        index, seed = int(key[0]), int(key[1])
    else:
        index = seed = int(key)
    return index, np.random.default_rng(seed)


class ResumableBatchSampler:
    """Infinite batch sampler whose batch ``i`` depends only on ``(seed, i, rank)``.

    Samples are drawn without replacement within each epoch (a fresh permutation per epoch).
    Each batch is a list of ``(index, sample_seed)`` pairs.  With ``world_size`` processes, rank
    ``r`` takes the ``r``-th slice of every global batch, so ranks never see the same sample.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int = 0, start_iteration: int = 0,
                 rank: int = 0, world_size: int = 1):
        if n_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_iteration, self.rank, self.world_size = start_iteration, rank, world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return self._perm

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        """The ``(index, sample_seed)`` pairs of this rank at ``iteration``."""
        first = (iteration * self.world_size + self.rank) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.n_items)
            sample_seed = int(np.random.default_rng([self.seed, 1, position]).integers(2**62))
            out.append((int(self._permutation(epoch)[offset]), sample_seed))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        iteration = self.start_iteration
        while True:
            yield self.batch(iteration)
            iteration += 1


def to_unit_range(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 array -> float32 tensor in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Moving MNIST (Srivastava et al., mnist_test_seq.npy)
# ---------------------------------------------------------------------------------------------


class MovingMNIST(Dataset):
    """Clips of ``mnist_test_seq.npy``, uint8 ``(20, 10000, 64, 64)``: a random ``n_frames`` window.

    Returns ``(1, n_frames, 64, 64)`` float32 in ``[-1, 1]``.
    """

    def __init__(self, path, n_frames: int = 16):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Moving MNIST file not found (expected mnist_test_seq.npy)")
        try:
            data = np.load(path, mmap_mode="r")
        except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        if data.ndim != 4 or data.dtype != np.uint8:
            raise ValueError(
                f"{path}: expected a uint8 array (frames, videos, height, width) like (20, 10000, 64, 64), "
                f"got {data.dtype} {tuple(data.shape)}"
            )
        if data.shape[0] < n_frames:
            raise ValueError(f"{path}: videos have {data.shape[0]} frames, fewer than --n-frames {n_frames}")
        self.path, self.data, self.n_frames = path, data, n_frames

    def __len__(self) -> int:
        return self.data.shape[1]

    def __getitem__(self, key: Key) -> torch.Tensor:
        index, rng = split_key(key)
        start = int(rng.integers(0, self.data.shape[0] - self.n_frames + 1))
        clip = self.data[start : start + self.n_frames, index]
        return to_unit_range(clip)[None]


def download_moving_mnist(dest, url: str = MOVING_MNIST_URL, timeout: float = 10.0) -> Path:
    """Download ``mnist_test_seq.npy`` to ``dest`` with a progress bar (atomic: temp file, rename)."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Procedural moving digits (no download)
# ---------------------------------------------------------------------------------------------


def _arc(cx, cy, rx, ry, a0, a1, n=16):
    angles = np.deg2rad(np.linspace(a0, a1, n))
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1)


def _line(*points):
    return np.array(points, dtype=np.float64)


# Pen strokes of the ten digits in a unit box (x right, y down); angles in degrees, clockwise.
DIGIT_STROKES = {
    0: [_arc(0.5, 0.5, 0.3, 0.45, 0, 360, 32)],
    1: [_line((0.32, 0.22), (0.52, 0.04), (0.52, 0.96))],
    2: [np.concatenate([_arc(0.5, 0.3, 0.3, 0.26, 190, 380), _line((0.2, 0.95), (0.85, 0.95))])],
    3: [_arc(0.48, 0.27, 0.27, 0.23, 200, 450), _arc(0.48, 0.72, 0.32, 0.25, 270, 520)],
    4: [_line((0.66, 0.96), (0.66, 0.04), (0.14, 0.66), (0.86, 0.66))],
    5: [np.concatenate([_line((0.8, 0.05), (0.32, 0.05), (0.27, 0.45)), _arc(0.5, 0.68, 0.3, 0.27, 220, 500)])],
    6: [np.concatenate([_arc(0.95, 0.62, 0.68, 0.58, 240, 180), _arc(0.52, 0.72, 0.25, 0.23, 180, 540)])],
    7: [_line((0.14, 0.05), (0.86, 0.05), (0.42, 0.96))],
    8: [_arc(0.5, 0.26, 0.21, 0.2, 0, 360, 28), _arc(0.5, 0.71, 0.26, 0.25, 0, 360, 28)],
    9: [_arc(0.5, 0.3, 0.25, 0.23, 0, 360, 28), _line((0.75, 0.3), (0.64, 0.96))],
}


def render_digit(digit: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Draw one hand-written-looking digit as float ``(size, size)`` in ``[0, 1]``.

    Random slant, rotation, scale and pen width give a different glyph for every seed; like
    MNIST, the glyph sits in the central 20x20 box of a 28x28 image.
    """
    angle = np.deg2rad(rng.uniform(-12, 12))
    shear = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.85, 1.05) * 20
    width = rng.uniform(1.1, 1.9)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    transform = rot @ np.array([[1.0, -shear], [0.0, 1.0]]) * scale
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    pixels = np.stack([xs.ravel(), ys.ravel()], 1)
    dist = np.full(len(pixels), np.inf)
    for stroke in DIGIT_STROKES[digit]:
        pts = (stroke - 0.5) @ transform.T + size / 2 + rng.normal(0, 0.4, size=2)
        a, b = pts[:-1], pts[1:]
        ab = b - a
        # distance from every pixel centre to every segment of the stroke
        t = ((pixels[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab**2).sum(-1), 1e-9)[None]
        closest = a[None] + np.clip(t, 0, 1)[..., None] * ab[None]
        dist = np.minimum(dist, np.linalg.norm(pixels[:, None] - closest, axis=-1).min(1))
    return np.clip(width + 0.5 - dist, 0, 1).reshape(size, size)


def bounce_trajectory(rng: np.random.Generator, n_frames: int, span: float) -> np.ndarray:
    """Top-left positions ``(n_frames, 2)`` of a glyph moving in a straight line, bouncing off walls.

    Like Srivastava et al.'s generator: random start, random direction, fixed speed.
    """
    position = rng.uniform(0, span, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    velocity = np.array([np.cos(theta), np.sin(theta)]) * span * 0.1
    out = np.empty((n_frames, 2))
    for t in range(n_frames):
        out[t] = position
        position = position + velocity
        for axis in range(2):
            if position[axis] < 0 or position[axis] > span:
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], 0, span)
    return out


class MovingDigits(Dataset):
    """Procedural Moving MNIST: two stroke-drawn digits bouncing in a 64x64 frame.

    Nothing is downloaded; sample ``(index, seed)`` is a pure function of ``seed``.
    Returns ``(1, n_frames, size, size)`` float32 in ``[-1, 1]`` (black background, like MNIST).
    """

    def __init__(self, n_frames: int = 16, size: int = 64, n_digits: int = 2, length: int = 10000):
        self.n_frames, self.size, self.n_digits, self.length = n_frames, size, n_digits, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Key) -> torch.Tensor:
        _, rng = split_key(key)
        video = np.zeros((self.n_frames, self.size, self.size), np.float32)
        glyph_size = 28
        for _ in range(self.n_digits):
            glyph = render_digit(int(rng.integers(10)), rng, glyph_size)
            path = np.round(bounce_trajectory(rng, self.n_frames, self.size - glyph_size)).astype(int)
            for t, (x, y) in enumerate(path):
                window = video[t, y : y + glyph_size, x : x + glyph_size]
                np.maximum(window, glyph, out=window)  # overlapping digits: max, as the original
        return torch.from_numpy(video * 2 - 1)[None]


def open_moving_mnist(data: str, n_frames: int, default_path="data/mnist_test_seq.npy"):
    """Resolve ``--data auto|synthetic|PATH`` to a dataset.

    ``auto``: ``default_path`` if present, else try downloading it, else procedural digits with a
    warning.  An explicit ``PATH`` that is missing or malformed raises; it never falls back.
    """
    if data == "synthetic":
        return MovingDigits(n_frames)
    if data != "auto":
        return MovingMNIST(data, n_frames)
    path = Path(default_path)
    if not path.is_file():
        try:
            download_moving_mnist(path)
        except Exception as err:  # noqa: BLE001 - no network is an expected case here
            warnings.warn(
                f"Moving MNIST not found at {path} and the download failed ({type(err).__name__}: {err}). "
                "TRAINING ON PROCEDURAL MOVING DIGITS INSTEAD: not the real data set. Put "
                f"mnist_test_seq.npy at {path} or pass --data PATH for real Moving MNIST.",
                stacklevel=2,
            )
            print("*** Using procedural moving digits (no real Moving MNIST available) ***", file=sys.stderr)
            return MovingDigits(n_frames)
    return MovingMNIST(path, n_frames)


# ---------------------------------------------------------------------------------------------
# The real-data pyramid (SPEC §4)
# ---------------------------------------------------------------------------------------------


def real_pyramid(x: torch.Tensor, frame_strides: Sequence[int], batch_strides: Sequence[int],
                 labels: torch.Tensor = None):
    """The real counterpart of the generator's renders.

    ``x``: full-resolution clips ``(N, C, T, H, W)``.  Level ``l`` (1-based, ``L`` levels) is the
    clip after ``l - 1`` rounds of subsampling (random frame offset, batch stride), average-pooled
    spatially by ``2 ** (L - l)``.  Returns ``[x1, ..., xL]`` (and the labels of every level, subsampled
    with the same batch strides, when ``labels`` is given).
    """
    n_levels = len(frame_strides) + 1
    levels, level_labels = [], []
    for level in range(n_levels):
        if level > 0:
            x = subsample(x, frame_strides[level - 1], batch_strides[level - 1], time_dim=2)
            if labels is not None:
                labels = labels[:: batch_strides[level - 1]]
        factor = 2 ** (n_levels - 1 - level)
        levels.append(F.avg_pool3d(x, (1, factor, factor)) if factor > 1 else x.contiguous())
        level_labels.append(labels)
    return (levels, level_labels) if labels is not None else levels
