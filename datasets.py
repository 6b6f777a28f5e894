"""Training data: Moving MNIST, procedural moving digits, UCF-101 and folders of videos, the resumable
sampler, and reading video files.

Every dataset here returns clips ``(C, T, H, W)`` as uint8 (the trainer maps them to ``[-1, 1]``
on the device with :func:`to_unit_range`, so workers, pinned memory and the host-to-device copy
move a quarter of the bytes of float32) and is indexed by
``(index, sample_seed)`` pairs from :class:`ResumableBatchSampler`: all of a sample's randomness
(window start, crop, flip, digit motion) comes from ``sample_seed``, so a run resumed at
iteration ``i`` sees exactly the batches an uninterrupted run would, whatever the worker count.
"""

import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils import InputError, first_line, write_json

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


def to_unit_range(frames_uint8) -> torch.Tensor:
    """uint8 frames (array or tensor, any shape) -> float32 in ``[-1, 1]`` (on the tensor's device)."""
    if isinstance(frames_uint8, np.ndarray):
        frames_uint8 = torch.from_numpy(np.ascontiguousarray(frames_uint8))
    return frames_uint8.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# Moving MNIST (Srivastava et al., mnist_test_seq.npy)
# ---------------------------------------------------------------------------------------------


MOVING_MNIST_FRAMES, MOVING_MNIST_SIZE = 20, 64  # mnist_test_seq.npy: 20-frame 64x64 sequences
MOVING_MNIST_LAYOUT = f"(frames, videos, {MOVING_MNIST_SIZE}, {MOVING_MNIST_SIZE}) like (20, 10000, 64, 64)"


class MovingMNIST(Dataset):
    """Clips of ``mnist_test_seq.npy``, uint8 ``(20, 10000, 64, 64)``: a random ``n_frames`` window.

    Returns uint8 ``(1, n_frames, 64, 64)``.
    """

    def __init__(self, path, n_frames: int = 16):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Moving MNIST file not found (expected mnist_test_seq.npy)")
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # np.load would call any other file "pickled data"
            raise ValueError(f"{path}: not a readable .npy array (no NumPy header); expected mnist_test_seq.npy, "
                             f"uint8 {MOVING_MNIST_LAYOUT}")
        try:
            data = np.load(path, mmap_mode="r")
        except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        if data.ndim != 4 or data.dtype != np.uint8 or data.shape[2:] != (MOVING_MNIST_SIZE,) * 2:
            raise ValueError(f"{path}: expected a uint8 array {MOVING_MNIST_LAYOUT}, "
                             f"got {data.dtype} {tuple(data.shape)}")
        if data.shape[1] == 0:
            raise ValueError(f"{path}: holds 0 videos (shape {tuple(data.shape)}); expected uint8 {MOVING_MNIST_LAYOUT}")
        if data.shape[0] < n_frames:
            raise ValueError(f"{path}: videos have {data.shape[0]} frames, fewer than --n-frames {n_frames}")
        self.path, self.data, self.n_frames = path, data, n_frames

    def __len__(self) -> int:
        return self.data.shape[1]

    def __getitem__(self, key: Key) -> torch.Tensor:
        index, rng = split_key(key)
        start = int(rng.integers(0, self.data.shape[0] - self.n_frames + 1))
        clip = self.data[start : start + self.n_frames, index]
        return torch.from_numpy(np.ascontiguousarray(clip))[None]


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
    Returns uint8 ``(1, n_frames, size, size)`` (black background, like MNIST).
    """

    def __init__(self, n_frames: int = 16, size: int = 64, n_digits: int = 2, length: int = 10000):
        self.n_frames, self.size, self.n_digits, self.length = n_frames, size, n_digits, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.clip(key)[0]

    def clip(self, key: Key) -> Tuple[torch.Tensor, np.ndarray]:
        """The video uint8 ``(1, n_frames, size, size)`` of ``key`` and its digits int64 ``(n_digits,)``."""
        _, rng = split_key(key)
        video = np.zeros((self.n_frames, self.size, self.size), np.float32)
        glyph_size = 28
        digits = np.empty(self.n_digits, np.int64)
        for i in range(self.n_digits):
            digits[i] = int(rng.integers(10))
            glyph = render_digit(int(digits[i]), rng, glyph_size)
            path = np.round(bounce_trajectory(rng, self.n_frames, self.size - glyph_size)).astype(int)
            for t, (x, y) in enumerate(path):
                window = video[t, y : y + glyph_size, x : x + glyph_size]
                np.maximum(window, glyph, out=window)  # overlapping digits: max, as the original
        return torch.from_numpy(np.round(video * 255).astype(np.uint8))[None], digits


def open_moving_mnist(data: str, n_frames: int, default_path="data/mnist_test_seq.npy"):
    """Resolve ``--data auto|synthetic|PATH`` to a dataset.

    ``auto``: ``default_path`` if present, else try downloading it, else procedural digits with a
    warning.  An explicit ``PATH`` that is missing or malformed raises; it never falls back.
    """
    if data in ("synthetic", "auto") and n_frames > MOVING_MNIST_FRAMES:
        # The procedural digits stand in for the real set, so they are held to its sequence length.
        raise ValueError(f"--n-frames {n_frames}: Moving MNIST sequences have {MOVING_MNIST_FRAMES} frames; "
                         f"expected at most {MOVING_MNIST_FRAMES}")
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
# UCF-101 and folders of videos
# ---------------------------------------------------------------------------------------------
#
# Pre-processing (docs/METHOD.md, 'UCF-101': the paper's recipe at resolution R = 192; other R scale every size by
# R / 192): every frame is resized to R x round(4R/3) (192 x 256) with swscale's bicubic filter, a
# R-wide window is cropped whose left edge is drawn uniformly from [m, round(4R/3) - R - m] with
# the margin m = round(4R/192) (4 px at 192: columns 4..60), the clip is flipped horizontally with
# probability 1/2, and T consecutive frames start at a uniform frame in [0, frames - T].  Videos of
# another aspect ratio are stretched to 4:3 like UCF-101's 320x240.  The resized frames are all that
# differs between decoding and the frame cache, so both produce the same bits for the same key.


VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm")
# The one resize used by decoding and by the cache: bicubic, as the authors' preparation script.
RESIZE_INTERPOLATION = "BICUBIC"
# Every colour conversion runs on one swscale thread: a pool made before DataLoader forks its workers hangs them.
SWSCALE_THREADS = 1
CACHE_FORMAT = "tgan2-frame-cache/2"  # /1 held area-resized frames
UCF101_NAME = re.compile(r"^v_(?P<cls>.+)_g\d+_c\d+$")


def paper_geometry(resolution: int = 192) -> Tuple[int, int, int]:
    """``(height, width, margin)`` of the resized frames: 192 -> (192, 256, 4), 64 -> (64, 85, 1)."""
    if resolution < 8:
        raise ValueError(f"--resolution {resolution}: expected at least 8 pixels")
    return resolution, int(round(resolution * 4 / 3)), int(round(resolution * 4 / 192))


class VideoError(Exception):
    """A video that cannot be opened, demuxed or decoded."""


@dataclass
class VideoInfo:
    """What :func:`probe_video` learns from the packets of a video's first video stream.

    ``pts``: sorted presentation timestamps of the ``n_frames`` frames (frame ``i`` is ``pts[i]``),
    or ``None`` when the container has none usable (then clips are decoded from the start).
    ``key_pts`` / ``key_seek``: each keyframe's pts and the timestamp to seek to for it (its dts).
    """

    n_frames: int
    pts: Optional[np.ndarray]
    key_pts: np.ndarray
    key_seek: np.ndarray


def probe_video(path) -> VideoInfo:
    """Count the frames of ``path`` by demuxing its packets (no decoding but one frame).

    Raises :class:`VideoError` when the file cannot be opened, has no video stream or its first
    frame cannot be decoded (an unsupported codec, a corrupt stream).
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            pts, key_pts, key_seek, decoded = [], [], [], False
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
                    key_seek.append(packet.dts if packet.dts is not None else packet.pts)
                if not decoded and len(pts) <= 32:  # a few packets: B-frames delay the first output
                    decoded = bool(stream.decode(packet))
            if pts and not decoded:
                decoded = bool(stream.decode(None))
    except VideoError:
        raise
    except Exception as err:  # noqa: BLE001 - FFmpeg reports broken files with many error types
        raise VideoError(f"unreadable ({type(err).__name__}: {err})") from None
    if not pts:
        raise VideoError("no video frames")
    if not decoded:
        raise VideoError("no decodable frame")
    ordered = None
    if None not in pts and None not in key_pts and None not in key_seek:
        ordered = np.sort(np.asarray(pts, np.int64))
        if (np.diff(ordered) <= 0).any():  # duplicate timestamps: frame i is not pts[i]
            ordered = None
    if ordered is None:
        return VideoInfo(len(pts), None, np.zeros(0, np.int64), np.zeros(0, np.int64))
    order = np.argsort(np.asarray(key_pts, np.int64), kind="stable")
    return VideoInfo(len(pts), ordered, np.asarray(key_pts, np.int64)[order], np.asarray(key_seek, np.int64)[order])


def frame_to_rgb(frame, height: int, width: int) -> np.ndarray:
    """Decoded PyAV frame -> uint8 ``(height, width, 3)`` RGB (colour conversion and resize in one swscale pass)."""
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=RESIZE_INTERPOLATION,
                            threads=SWSCALE_THREADS)


def decode_video(path, height: int, width: int) -> np.ndarray:
    """Every frame of ``path``, in order, resized: uint8 ``(frames, height, width, 3)``."""
    try:
        with av.open(str(path)) as container:
            frames = [frame_to_rgb(f, height, width) for f in container.decode(container.streams.video[0])]
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the video unreadable
        raise VideoError(f"decoding failed ({type(err).__name__}: {err})") from None
    if not frames:
        raise VideoError("no decodable frame")
    return np.stack(frames)


def read_clip(path, start: int, length: int, height: int, width: int, info: Optional[VideoInfo] = None) -> np.ndarray:
    """Frames ``start .. start + length - 1`` of ``path``, resized: uint8 ``(length, height, width, 3)``.

    With ``info`` (from :func:`probe_video`) it seeks to the last keyframe at or before the first
    frame and decodes only up to the last one; the result equals the same frames of
    :func:`decode_video` (every frame's timestamp is checked, else it decodes from the start).
    Raises :class:`VideoError` when the video ends early or fails to decode.
    """
    try:
        if info is not None and info.pts is not None and start + length <= info.n_frames:
            clip = _read_clip_seeking(path, start, length, height, width, info)
            if clip is not None:
                return clip
        return _read_clip_sequential(path, start, length, height, width)
    except VideoError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the video unreadable
        raise VideoError(f"decoding failed ({type(err).__name__}: {err})") from None


def _read_clip_seeking(path, start, length, height, width, info: VideoInfo) -> Optional[np.ndarray]:
    wanted = info.pts[start : start + length]
    key = int(np.searchsorted(info.key_pts, wanted[0], side="right")) - 1
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if key > 0:  # the first keyframe is where decoding starts anyway
            container.seek(int(info.key_seek[key]), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            if frame.pts < wanted[0]:
                continue  # decoded only as a reference for the frames we keep
            if frame.pts != wanted[len(out)]:
                return None  # the stream disagrees with its packets: fall back to counting frames
            out.append(frame_to_rgb(frame, height, width))
            if len(out) == length:
                return np.stack(out)
    return None


def _read_clip_sequential(path, start, length, height, width) -> np.ndarray:
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i >= start:
                out.append(frame_to_rgb(frame, height, width))
                if len(out) == length:
                    return np.stack(out)
    raise VideoError(f"ended before frame {start + length} (needed frames {start}..{start + length - 1})")


def crop_and_flip(frames: np.ndarray, left: int, size: int, flip: bool) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> uint8 ``(3, T, H, size)``: columns ``left .. left+size-1``, mirrored if ``flip``."""
    window = frames[:, :, left : left + size]
    if flip:
        window = window[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(window.transpose(3, 0, 1, 2)))


def find_videos(root, suffixes: Sequence[str] = VIDEO_EXTENSIONS) -> List[str]:
    """Paths (relative to ``root``, sorted, ``/``-separated) of every file below ``root`` ending in one of
    ``suffixes`` (default ``.avi/.mp4/.mkv/.webm``), except ``grid.*``: generate.py's sample grids."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of videos")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in suffixes and p.stem != "grid" and p.is_file())


# UCF-101's official split lists ------------------------------------------------------------


def ucf101_class_of(name: str) -> str:
    """``.../v_ApplyEyeMakeup_g08_c01.avi`` -> ``ApplyEyeMakeup`` (``""`` for another name)."""
    match = UCF101_NAME.match(Path(name).stem)
    return match.group("cls") if match else ""


def find_ucf101_splits(root, splits_dir=None) -> Optional[Path]:
    """The folder holding ``classInd.txt``: ``splits_dir`` if given, else ``ROOT/ucfTrainTestlist``,
    ``ROOT/../ucfTrainTestlist`` or ``ROOT`` itself; ``None`` if there is none (no explicit folder)."""
    if splits_dir is not None:
        splits_dir = Path(splits_dir)
        if not (splits_dir / "classInd.txt").is_file():
            raise FileNotFoundError(f"--splits {splits_dir}: no classInd.txt there")
        return splits_dir
    root = Path(root)
    for candidate in (root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist", root):
        if (candidate / "classInd.txt").is_file():
            return candidate
    return None


def require_ucf101_splits(root, splits_dir=None) -> Path:
    """:func:`find_ucf101_splits`, raising ``FileNotFoundError`` when there are none."""
    found = find_ucf101_splits(root, splits_dir)
    if found is None:
        raise FileNotFoundError(f"--data {root}: no ucfTrainTestlist/classInd.txt in it or next to it; pass --splits DIR")
    return found


def read_class_index(path) -> List[str]:
    """``classInd.txt`` (lines ``"1 ApplyEyeMakeup"``) -> class names ordered by their number."""
    path = Path(path)
    numbered = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{line_no}: expected '<number> <ClassName>', got {line.strip()!r}")
        numbered[int(fields[0])] = fields[1]
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise ValueError(f"{path}: class numbers must be 1..{len(numbered)}")
    return [numbered[i] for i in range(1, len(numbered) + 1)]


def read_ucf101_split(splits_dir, fold: int, split: str) -> Tuple[List[str], List[int], List[str]]:
    """Videos of ``trainlist0F.txt`` / ``testlist0F.txt`` (``split`` train, test or all = both).

    Returns ``(paths, labels, classes)``: ``Class/v_Class_gXX_cYY.avi`` as listed, 0-based labels
    (``classInd.txt`` number - 1) and the class names.  The class of a video is its folder in the
    list; a class missing from ``classInd.txt`` or a label disagreeing with it raises ``ValueError``.
    """
    if fold not in (1, 2, 3):
        raise ValueError(f"--fold {fold}: UCF-101 has folds 1, 2 and 3")
    if split not in ("train", "test", "all"):
        raise ValueError(f"--split {split}: expected train, test or all")
    splits_dir = Path(splits_dir)
    classes = read_class_index(splits_dir / "classInd.txt")
    number = {name.lower(): i for i, name in enumerate(classes)}  # the release spells one class two ways
    paths, labels = [], []
    for part in (("train", "test") if split == "all" else (split,)):
        list_path = splits_dir / f"{part}list{fold:02d}.txt"
        if not list_path.is_file():
            raise FileNotFoundError(f"{list_path}: split file not found (--fold {fold} --split {part})")
        for line_no, line in enumerate(list_path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            rel = fields[0].replace("\\", "/")
            class_name = rel.split("/")[0] if "/" in rel else ucf101_class_of(rel)
            if class_name.lower() not in number:
                raise ValueError(f"{list_path}:{line_no}: class {class_name!r} of {rel} is not in {splits_dir / 'classInd.txt'}")
            label = number[class_name.lower()]
            if len(fields) > 1 and not fields[1].isdigit():
                raise ValueError(f"{list_path}:{line_no}: expected '<path> <class number>', got {line.strip()!r}")
            if len(fields) > 1 and int(fields[1]) != label + 1:
                raise ValueError(f"{list_path}:{line_no}: label {fields[1]} of {rel} disagrees with classInd.txt "
                                 f"({classes[label]} is {label + 1})")
            paths.append(rel)
            labels.append(label)
    return paths, labels, classes


# The datasets ----------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


_warned_paths = set()  # per process: a video that fails mid-training is reported once


class VideoClips(Dataset):
    """Random clips of a list of videos with the paper's pre-processing (see the banner above).

    ``paths``: video files relative to ``root``; ``labels``: their class numbers into ``classes``.
    Frames come from decoding with PyAV (each call opens its own file, so any number of DataLoader
    workers is safe) or, with ``cache``, from a folder written by :func:`prepare_frame_cache`.
    Videos that cannot be read or have fewer than ``n_frames`` frames are dropped when the dataset
    opens, one warning line each and a count; ``skipped`` lists them as ``(path, reason)``.

    ``__getitem__((index, seed))`` returns uint8 ``(3, n_frames, R, R)``, or
    ``(clip, label)`` with ``return_label``.  ``labels[i]`` / ``classes`` give the class of video ``i``.
    """

    def __init__(self, root, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str],
                 n_frames: int = 16, resolution: int = 192, cache=None, return_label: bool = False,
                 name: str = "videos", progress: bool = True):
        self.root = Path(root) if root is not None else None
        self.n_frames, self.resolution, self.return_label, self.name = n_frames, resolution, return_label, name
        self.height, self.width, self.margin = paper_geometry(resolution)
        if self.width - resolution - 2 * self.margin < 0:
            raise ValueError(f"--resolution {resolution}: the crop does not fit the resized frames")
        self.classes = list(classes)
        self.cache = Path(cache) if cache is not None else None
        self._frames = None  # the cache's memory map, opened lazily in each process
        if self.cache is not None:
            entries, skipped = self._from_cache(paths)
        else:
            entries, skipped = self._probe(paths, progress)
        kept = []
        for i, entry in enumerate(entries):
            if entry is not None and entry[1] < n_frames:
                skipped.append((paths[i], f"only {entry[1]} frames, fewer than {n_frames}"))
            elif entry is not None:
                kept.append(i)
        for path, reason in skipped:
            _warn(f"{name}: skipping {path}: {reason}")
        if skipped:
            _warn(f"{name}: skipped {len(skipped)} of {len(paths)} videos (unreadable, corrupt or too short)")
        if not kept:
            raise ValueError(f"{name}: none of the {len(paths)} videos is readable with at least {n_frames} frames")
        self.skipped = skipped
        self.paths = [entries[i][0] for i in kept]
        self.labels = np.asarray([labels[i] for i in kept], np.int64)
        self.frame_counts = np.asarray([entries[i][1] for i in kept], np.int64)
        self.infos = [entries[i][2] for i in kept]  # VideoInfo when decoding, cache offset with a cache

    def _probe(self, paths, progress):
        from tqdm import tqdm

        entries, skipped = [], []
        for rel in tqdm(paths, desc=f"probing {self.name}", unit="video", leave=False, disable=None if progress else True):
            path = self.root / rel
            if not path.is_file():
                entries.append(None)
                skipped.append((rel, "file not found"))
                continue
            try:
                info = probe_video(path)
            except VideoError as err:
                entries.append(None)
                skipped.append((rel, str(err)))
                continue
            entries.append((rel, info.n_frames, info))
        return entries, skipped

    def _from_cache(self, paths):
        index = load_cache_index(self.cache, self.height, self.width)
        entries, skipped, missing = [], [], []
        for rel in paths:
            # a flat UCF-101 tree stores v_X.avi where the split list says Class/v_X.avi
            key = next((k for k in (rel, rel.split("/")[-1]) if k in index["videos"] or k in index["skipped"]), None)
            if key is None:
                missing.append(rel)
                entries.append(None)
            elif key in index["skipped"]:
                skipped.append((rel, index["skipped"][key]))
                entries.append(None)
            else:
                video = index["videos"][key]
                entries.append((key, int(video["n_frames"]), int(video["offset"])))
        if missing:
            raise ValueError(f"--cache {self.cache}: {len(missing)} of the {len(paths)} videos of {self.name} are not "
                             f"in the cache (e.g. {missing[0]}); run `python train_ucf101.py prepare` with the same "
                             "--data/--fold/--split to add them (it resumes)")
        return entries, skipped

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_frames"] = None  # a memory map must not be pickled into workers: each maps the file itself
        return state

    def sample_params(self, index: int, rng: np.random.Generator) -> Tuple[int, int, bool]:
        """Draw ``(start frame, crop left edge, flip)`` for video ``index``, in this order, from ``rng``."""
        start = int(rng.integers(0, self.frame_counts[index] - self.n_frames + 1))
        left = int(rng.integers(self.margin, self.width - self.resolution - self.margin + 1))
        return start, left, bool(rng.random() < 0.5)

    def frames(self, index: int, start: int) -> np.ndarray:
        """Resized, uncropped frames ``start .. start + n_frames - 1`` of video ``index``: uint8 ``(T, R, W, 3)``."""
        if self.cache is None:
            return read_clip(self.root / self.paths[index], start, self.n_frames, self.height, self.width,
                             self.infos[index])
        if self._frames is None:
            self._frames = open_cache_frames(self.cache, self.height, self.width)
        first = self.infos[index] + start
        return self._frames[first : first + self.n_frames]

    def __getitem__(self, key: Key):
        index, rng = split_key(key)
        for attempt in range(len(self)):
            # a video that fails now (it probed fine) is replaced by the next one, drawn from the same rng
            i = (index + attempt) % len(self)
            start, left, flip = self.sample_params(i, rng)
            try:
                frames = self.frames(i, start)
            except VideoError as err:
                if self.paths[i] not in _warned_paths:
                    _warned_paths.add(self.paths[i])
                    _warn(f"{self.name}: {self.paths[i]}: {err}; using the next video instead")
                continue
            clip = crop_and_flip(frames, left, self.resolution, flip)
            return (clip, int(self.labels[i])) if self.return_label else clip
        raise RuntimeError(f"{self.name}: no video could be decoded")

    def describe(self) -> str:
        source = f"frame cache {self.cache}" if self.cache is not None else f"decoded from {self.root}"
        return (f"{self.name}: {len(self)} videos, {len(self.classes)} classes, {self.n_frames}-frame clips, "
                f"frames {self.height}x{self.width} cropped to {self.resolution}, {source}"
                + (f", {len(self.skipped)} skipped" if self.skipped else ""))


class UCF101(VideoClips):
    """UCF-101 through its official split lists (``fold`` 1..3, ``split`` train, test or all).

    ``root``: ``UCF-101/`` with ``<Class>/v_<Class>_gXX_cYY.avi`` or the videos directly in it.
    ``splits_dir``: the folder of ``classInd.txt`` and ``trainlist0F.txt`` / ``testlist0F.txt``;
    by default ``ROOT/ucfTrainTestlist`` or ``ROOT/../ucfTrainTestlist``.  ``labels`` are 0-based
    (``classInd.txt`` number - 1) and ``classes`` the 101 names in that order.  With ``cache`` only
    the split lists are read from disk, not the videos.
    """

    def __init__(self, root, fold: int = 1, split: str = "train", splits_dir=None, n_frames: int = 16,
                 resolution: int = 192, cache=None, return_label: bool = False, progress: bool = True):
        paths, labels, classes, self.splits_dir = list_ucf101(root, fold, split, splits_dir, need_videos=cache is None)
        self.fold, self.split = fold, split
        super().__init__(root, paths, labels, classes, n_frames, resolution, cache, return_label,
                         name=f"UCF-101 fold {fold} {split}", progress=progress)


class VideoFolder(VideoClips):
    """Every ``.avi/.mp4/.mkv/.webm`` below ``root`` (FaceForensics and the like), same pre-processing.

    The class of a video is its folder relative to ``root`` (``"."`` for files directly in it);
    ``classes`` are those folders sorted and ``labels`` index them.
    """

    def __init__(self, root, n_frames: int = 16, resolution: int = 192, cache=None, return_label: bool = False,
                 progress: bool = True):
        paths, labels, classes = list_video_folder(root)
        super().__init__(root, paths, labels, classes, n_frames, resolution, cache, return_label,
                         name=f"videos in {root}", progress=progress)


def list_ucf101(root, fold: int = 1, split: str = "train", splits_dir=None, need_videos: bool = True):
    """The videos of a UCF-101 split: ``(paths relative to root, labels, classes, splits folder)``.

    With ``need_videos`` each listed ``Class/v_X.avi`` is looked up in ``root``, or as ``v_X.avi``
    directly in it (a flat copy); a root holding none of them raises ``FileNotFoundError``.
    """
    root = Path(root)
    found = require_ucf101_splits(root, splits_dir)
    paths, labels, classes = read_ucf101_split(found, fold, split)
    if need_videos:
        if not root.is_dir():
            raise FileNotFoundError(f"--data {root}: no such folder")
        flat = [p.split("/")[-1] for p in paths]
        paths = [f if not (root / p).is_file() and (root / f).is_file() else p for p, f in zip(paths, flat)]
        if not any((root / p).is_file() for p in paths):
            raise FileNotFoundError(f"--data {root}: none of the {len(paths)} videos listed in {found} is there "
                                    f"(e.g. {paths[0]})")
    return paths, labels, classes, found


def list_video_folder(root) -> Tuple[List[str], List[int], List[str]]:
    """Every video below ``root``: ``(paths, labels, classes)``, the class being the video's folder."""
    paths = find_videos(root)
    if not paths:
        raise ValueError(f"--data {root}: no videos ({'/'.join(VIDEO_EXTENSIONS)}) in this folder")
    folders = [Path(p).parent.as_posix() for p in paths]
    classes = sorted(set(folders))
    number = {c: i for i, c in enumerate(classes)}
    return paths, [number[f] for f in folders], classes


def video_dataset_kind(data, kind: str = "auto", splits_dir=None) -> str:
    """``ucf101`` or ``folder`` for ``--data`` and ``--dataset auto|ucf101|folder``.

    ``auto`` is ``ucf101`` when split lists are found (or ``splits_dir`` is given), else
    ``folder``; a tree of UCF-101 file names without split lists is an error rather than silently
    training on the train and test videos together.
    """
    if kind not in ("auto", "ucf101", "folder"):
        raise ValueError(f"--dataset {kind}: expected auto, ucf101 or folder")
    if kind != "auto":
        return kind
    if splits_dir is not None or find_ucf101_splits(data) is not None:
        return "ucf101"
    if any(ucf101_class_of(p) for p in find_videos(data)):
        raise FileNotFoundError(f"--data {data} looks like UCF-101 but has no ucfTrainTestlist/ in it or next to "
                                "it; pass --splits DIR for the official splits, or --dataset folder to use every video")
    return "folder"


def open_video_dataset(data, kind: str = "auto", fold: int = 1, split: str = "train", splits_dir=None,
                       n_frames: int = 16, resolution: int = 192, cache=None, return_label: bool = False) -> VideoClips:
    """``--data DIR`` -> :class:`UCF101` or :class:`VideoFolder` (``kind`` as in :func:`video_dataset_kind`)."""
    if video_dataset_kind(data, kind, splits_dir) == "ucf101":
        return UCF101(data, fold, split, splits_dir, n_frames, resolution, cache, return_label)
    return VideoFolder(data, n_frames, resolution, cache, return_label)


# The frame cache -------------------------------------------------------------------------------
#
# DIR/frames.u8: the resized frames of every video, uint8 (frames, R, round(4R/3), 3), one video
# after the other; DIR/index.json: per video its first frame and frame count (plus the videos
# that could not be read and why).  The index is rewritten atomically after the frames it names
# are on disk, so an interrupted `prepare` resumes where the index ends.


def load_cache_index(cache_dir, height: int, width: int) -> dict:
    """Read ``DIR/index.json``; raise if it is missing or was written for another frame size."""
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"--cache {cache_dir}: no index.json (build it with `python train_ucf101.py prepare`)")
    index = json.loads(path.read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"--cache {cache_dir}: not a frame cache of this version ({index.get('format')!r}, "
                         f"expected {CACHE_FORMAT!r}); prepare it again")
    if (index["height"], index["width"]) != (height, width):
        raise ValueError(f"--cache {cache_dir}: frames are {index['height']}x{index['width']}, not {height}x{width} "
                         f"(prepared with --resolution {index['resolution']})")
    data = Path(cache_dir) / "frames.u8"
    if (data.stat().st_size if data.is_file() else 0) < index["total_frames"] * height * width * 3:
        raise ValueError(f"--cache {cache_dir}: frames.u8 is missing or shorter than index.json says; "
                         "delete the folder and run prepare again")
    return index


def open_cache_frames(cache_dir, height: int, width: int) -> np.ndarray:
    """Memory-map ``DIR/frames.u8`` as uint8 ``(frames, height, width, 3)``, as far as the index reaches."""
    index = load_cache_index(cache_dir, height, width)
    return np.memmap(Path(cache_dir) / "frames.u8", np.uint8, "r", shape=(index["total_frames"], height, width, 3))


def _cache_one(job):
    """Worker of :func:`prepare_frame_cache`: ``(root, rel, h, w)`` -> ``(rel, frames or None, reason)``."""
    root, rel, height, width = job
    try:
        info = probe_video(Path(root) / rel)
        frames = decode_video(Path(root) / rel, height, width)
    except (VideoError, OSError) as err:
        return rel, None, str(err)
    if len(frames) != info.n_frames:  # decoding would index frames differently: keep the two paths equal
        return rel, None, f"decoded {len(frames)} of its {info.n_frames} frames"
    return rel, frames, ""


# prepare stops while this much disk is still free, so the index and the checkpoints can still be written
CACHE_FREE_SPACE_RESERVE = 1 << 30


def prepare_frame_cache(root, paths: Sequence[str], cache_dir, resolution: int, workers: int = 0,
                        progress: bool = True) -> dict:
    """Decode ``paths`` (relative to ``root``) once into the frame cache ``cache_dir``; return its index.

    Frames are resized exactly as :class:`VideoClips` resizes decoded frames, so training from the
    cache is bit-identical to decoding.  Videos already in the cache are skipped, so re-running
    after an interruption (or with more videos) continues; unreadable ones are recorded and warned.
    ``workers`` processes decode in parallel (0 = in this process).
    """
    from tqdm import tqdm

    height, width, _ = paper_geometry(resolution)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path, data_path = cache_dir / "index.json", cache_dir / "frames.u8"
    if index_path.is_file():
        index = load_cache_index(cache_dir, height, width)
    else:
        index = dict(format=CACHE_FORMAT, resolution=resolution, height=height, width=width,
                     interpolation=RESIZE_INTERPOLATION, source=str(root), total_frames=0, videos={}, skipped={})
    todo = [p for p in dict.fromkeys(paths) if p not in index["videos"] and p not in index["skipped"]]
    frame_bytes = height * width * 3
    # all of UCF-101 is about 2.5 M frames: some 340 GiB at 192 px, 150 GiB at 128, 38 GiB at 64
    print(f"frame cache {cache_dir}: {len(paths) - len(todo)} of {len(paths)} videos already there; "
          f"{frame_bytes / 2**10:.0f} KiB per {height}x{width} frame", file=sys.stderr)
    jobs = [(str(root), rel, height, width) for rel in todo]
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 0 else None
    results = pool.imap(_cache_one, jobs) if pool is not None else map(_cache_one, jobs)
    with open(data_path, "r+b" if data_path.exists() else "wb") as f:
        f.truncate(index["total_frames"] * frame_bytes)  # drop frames written after the last saved index
        f.seek(0, os.SEEK_END)

        def save_index():
            f.flush()
            os.fsync(f.fileno())
            index["complete"] = all(p in index["videos"] or p in index["skipped"] for p in paths)
            write_json(index_path, index)

        last_save = time.monotonic()
        try:
            with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="caching frames", unit="video",
                      disable=None if progress else True) as bar:
                for rel, frames, reason in results:
                    if frames is None:
                        index["skipped"][rel] = reason
                        _warn(f"frame cache: skipping {rel}: {reason}")
                    else:
                        if shutil.disk_usage(cache_dir).free < frames.nbytes + CACHE_FREE_SPACE_RESERVE:
                            raise OSError(f"--cache {cache_dir}: disk almost full; free space and run prepare "
                                          "again (it resumes)")
                        f.write(np.ascontiguousarray(frames).data)
                        index["videos"][rel] = {"offset": index["total_frames"], "n_frames": len(frames)}
                        index["total_frames"] += len(frames)
                    bar.update(1)
                    bar.set_postfix(GiB=f"{index['total_frames'] * frame_bytes / 2**30:.1f}")
                    if time.monotonic() - last_save > 10:
                        save_index()
                        last_save = time.monotonic()
        finally:
            save_index()
            if pool is not None:
                pool.terminate()
    if index["skipped"]:
        _warn(f"frame cache: {len(index['skipped'])} unreadable videos recorded in {index_path}")
    return index


# ---------------------------------------------------------------------------------------------
# Video files for evaluation: real sets and generated samples, read from their first frame
# ---------------------------------------------------------------------------------------------


# What evaluate.py reads: the training formats, generate.py's outputs (GIF, uint8 .npy) and .mov.
EVALUATION_SUFFIXES = VIDEO_EXTENSIONS + (".gif", ".mov", ".npy")


def video_paths(folder) -> List[Path]:
    """Every video file (:data:`EVALUATION_SUFFIXES`) below ``folder``, sorted; at least one, or :class:`InputError`."""
    paths = [Path(folder) / p for p in find_videos(folder, EVALUATION_SUFFIXES)]
    if not paths:
        raise InputError(f"{folder}: no videos ({', '.join(EVALUATION_SUFFIXES)}) found")
    return paths


def _decode_frames(path: Path, n_frames: int) -> np.ndarray:
    """The first ``n_frames`` frames of a file as uint8, ``(T, H, W)`` or ``(T, H, W, C)``."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        frames = np.load(path, mmap_mode="r")
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
            raise ValueError(f"expected uint8 frames (T, H, W[, C]) as generate.py writes, got {frames.dtype} {frames.shape}")
        return np.array(frames[:n_frames])  # a writable copy of the memory-mapped file
    frames = []
    if suffix == ".gif":
        import imageio.v3 as iio

        for frame in iio.imiter(path):
            frames.append(frame)
            if len(frames) == n_frames:
                break
    else:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24", threads=SWSCALE_THREADS))
                if len(frames) == n_frames:
                    break
    return np.stack(frames) if frames else np.zeros((0, 1, 1), np.uint8)


def read_video(path, n_frames: int = 16, square_crop: bool = True) -> torch.Tensor:
    """First ``n_frames`` frames of a ``.gif`` / video file / uint8 ``.npy`` as ``(C, T, H, W)`` in ``[-1, 1]``.

    C is 1 for grayscale files, else 3 (alpha dropped).  ``square_crop`` keeps the central square
    of non-square frames (the generator renders squares).  Raises ``ValueError`` for short files.
    """
    path = Path(path)
    frames = _decode_frames(path, n_frames)
    if len(frames) < n_frames:
        raise ValueError(f"{len(frames)} frames, fewer than the {n_frames} needed")
    if frames.ndim == 3:
        frames = frames[..., None]
    frames = frames[..., :3] if frames.shape[-1] >= 3 else frames[..., :1]
    if square_crop:
        h, w = frames.shape[1:3]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        frames = frames[:, top : top + side, left : left + side]
    return to_unit_range(frames).permute(3, 0, 1, 2)


class VideoFiles(Dataset):
    """``(path, (C, T, H, W) tensor)``, or ``(path, error message)`` for an unreadable file."""

    def __init__(self, paths: Sequence[Path], n_frames: int = 16, square_crop: bool = True):
        self.paths, self.n_frames, self.square_crop = list(paths), n_frames, square_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            return path, read_video(path, self.n_frames, self.square_crop)
        except Exception as err:  # noqa: BLE001 - any undecodable file is skipped and counted
            return path, f"{type(err).__name__}: {first_line(err)}"


def _as_list(batch):
    return batch


def folder_batches(paths: Sequence[Path], batch_size: int = 32, n_frames: int = 16, square_crop: bool = True,
                   workers: int = 0, skipped: Optional[List[Path]] = None) -> Iterator[List[torch.Tensor]]:
    """Decode ``paths`` in batches (lists of ``(C, T, H, W)`` tensors, sizes may differ).

    Unreadable or too-short files are skipped with a warning and appended to ``skipped``.
    """
    loader = DataLoader(VideoFiles(paths, n_frames, square_crop), batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list)
    for batch in loader:
        videos = []
        for path, item in batch:
            if isinstance(item, str):
                warnings.warn(f"skipping unreadable video {path}: {item}")
                if skipped is not None:
                    skipped.append(path)
            else:
                videos.append(item)
        if videos:
            yield videos
