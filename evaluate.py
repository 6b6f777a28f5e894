"""Inception Score, FID and FVD of a generator checkpoint or a folder of videos (docs/METHOD.md, 'Evaluation').

The protocol people compare against (Saito et al.): C3D fine-tuned on UCF-101 (the authors'
``conv3d_deepnetA_ucf.npz`` and ``mean2.npz``), 16-frame videos, IS of the fc8 softmax over 2048
samples, 1 split, repeated 10 times, reported as mean ± std; FID on C3D fc7 features against
dataset statistics; FVD on I3D features from a user-supplied TorchScript file.

    python evaluate.py is  --checkpoint runs/ucf101/checkpoint.pt \
        --c3d-weights conv3d_deepnetA_ucf.npz --c3d-mean mean2.npz
    python evaluate.py fid --checkpoint runs/ucf101/checkpoint.pt \
        --c3d-weights conv3d_deepnetA_ucf.npz --c3d-mean mean2.npz --real-videos UCF-101
    python evaluate.py fvd --videos samples/ --i3d i3d_torchscript.pt --real-stats stats/ucf101_i3d.npz

The pieces are importable for the training loop: load the models once with :func:`load_c3d`,
:func:`load_i3d` and :func:`real_statistics`, put them in an :class:`EvalModels`, then call
:func:`evaluate_generator` every few thousand iterations.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings
import weakref
import zipfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from datasets import MovingDigits, folder_batches, to_unit_range, video_paths
from models import fold_time, generated_batches, load_generator, sample_classes, sampling_mode, unfold_time
from utils import (InputError, OneLineArgumentParser, add_sampling_arguments, first_line, pick_device, positive_int,
                   report_error, sampling_overrides)

Stats = Tuple[np.ndarray, np.ndarray]  # (mu (D,), sigma (D, D))
Batch = Union[torch.Tensor, List[torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The maths: Inception Score and Fréchet distance
# ---------------------------------------------------------------------------------------------


def split_inception_scores(probs: np.ndarray, splits: int = 1) -> np.ndarray:
    """Inception Score of each of ``splits`` consecutive parts of ``probs``.

    ``probs``: class probabilities ``(N, K)`` (rows sum to 1).  For each part,
    ``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the part's mean row.  Returns ``(splits,)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits or splits < 1:
        raise ValueError(f"need (N, K) probabilities with N >= splits >= 1, got {probs.shape} and {splits} splits")
    n = len(probs)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        # a denormal probability divided by N can underflow to 0 (KL = inf): floor at the smallest normal float
        marginal = np.maximum(part.mean(axis=0, keepdims=True), np.finfo(np.float64).tiny)
        # rel_entr is p * log(p / q) with 0 for p = 0: exact for one-hot rows, no eps needed
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return np.array(scores)


def inception_score(probs: np.ndarray, splits: int = 1) -> Tuple[float, float]:
    """Mean and standard deviation over splits of the Inception Score of ``probs`` ``(N, K)``."""
    scores = split_inception_scores(probs, splits)
    return float(scores.mean()), float(scores.std())


def feature_statistics(feats: np.ndarray) -> Stats:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of features ``(N, D)``."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features (N, D) with N >= 2 to estimate a covariance, got {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`` with means ``(D,)``
    and covariances ``(D, D)``.  The trace term is computed with two symmetric eigendecompositions:
    ``(sigma1 sigma2)^(1/2)`` has the eigenvalues of ``A sigma2 A`` with ``A = sigma1^(1/2)``, which
    is symmetric PSD — exact, stable for singular covariances, and far faster than ``sqrtm`` for the
    4096-dimensional C3D features.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ---------------------------------------------------------------------------------------------
# .npz files: statistics caches and the authors' Chainer arrays
# ---------------------------------------------------------------------------------------------


def _open_npz(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        data = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable .npz file ({first_line(err)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: a single .npy array, expected an .npz archive ({what})")
    return _NpzArrays(data, path)


class _NpzArrays:
    """An open ``.npz`` whose arrays are read with a one-line :class:`InputError` for object (pickled) arrays."""

    def __init__(self, npz, path):
        self.npz, self.path, self.files = npz, path, npz.files

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.npz[key]
        except ValueError as err:  # object arrays need allow_pickle, which would let a file run code
            raise InputError(f"{self.path}: key {key!r} is not a plain numeric array ({first_line(err)})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.npz.close()


def save_statistics(path, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """Cache ``(mu, sigma)`` and JSON-able ``meta`` (feature name, source, count) as ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, meta=json.dumps(meta))
    tmp.replace(path)
    return path


def load_statistics(path, feature: Optional[str] = None) -> Stats:
    """Read ``(mu (D,), sigma (D, D))`` from a ``.npz`` written by :func:`save_statistics`.

    When ``feature`` is given and the file records another one (say I3D statistics passed to
    FID), raise :class:`InputError`.
    """
    with _open_npz(path, "statistics file") as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise InputError(f"{path}: missing key {missing[0]!r}; expected 'mu' (D,) and 'sigma' (D, D)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not (D,) and (D, D)")
    if feature is not None and meta.get("feature", feature) != feature:
        raise InputError(f"{path}: holds {meta['feature']!r} statistics, expected {feature!r}")
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# C3D fine-tuned on UCF-101 (the authors' Chainer model)
# ---------------------------------------------------------------------------------------------

# (name, in, out, max pooling after it); every pooling rounds up like Chainer's cover_all
C3D_CONVS = [
    ("conv1a", 3, 64, (1, 2, 2)),
    ("conv2a", 64, 128, 2),
    ("conv3a", 128, 256, None),
    ("conv3b", 256, 256, 2),
    ("conv4a", 256, 512, None),
    ("conv4b", 512, 512, 2),
    ("conv5a", 512, 512, None),
    ("conv5b", 512, 512, 2),
]
C3D_FCS = [("fc6", 512 * 4 * 4, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 101)]
C3D_SIZE = 112


class C3D(nn.Module):
    """C3D (Tran et al.) as the authors' ``C3DVersion1UCF101``, in eval-mode form (no dropout).

    Input: pre-processed clips ``(N, 3, 16, 112, 112)`` (see :func:`c3d_preprocess`).  Eight
    3x3x3 convolutions (pad 1) with ReLU and five max-poolings take them to pool5
    ``(N, 512, 1, 4, 4)``; fc6 and fc7 (4096, ReLU) and fc8 (101 UCF-101 classes) follow.
    ``mean`` is the cropped ``mean2.npz`` ``(3, T, 112, 112)`` set by :func:`load_c3d`.
    """

    def __init__(self):
        super().__init__()
        for name, c_in, c_out, _ in C3D_CONVS:
            self.add_module(name, nn.Conv3d(c_in, c_out, 3, padding=1))
        for name, c_in, c_out in C3D_FCS:
            self.add_module(name, nn.Linear(c_in, c_out))
        self.register_buffer("mean", None)

    def layers(self) -> Iterator[Tuple[str, nn.Module]]:
        """``(npz name, layer)`` in network order: conv1a ... conv5b, fc6, fc7, fc8."""
        for name, *_ in C3D_CONVS + C3D_FCS:
            yield name, getattr(self, name)

    def extract(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``pool5`` ``(N, 512, 1, 4, 4)``, ``fc7`` ``(N, 4096)`` (after ReLU) and ``fc8`` logits ``(N, 101)``."""
        h = x
        for name, _, _, pool in C3D_CONVS:
            h = F.relu(getattr(self, name)(h))
            if pool is not None:
                h = F.max_pool3d(h, pool, ceil_mode=True)
        pool5 = h
        fc7 = F.relu(self.fc7(F.relu(self.fc6(pool5.flatten(1)))))
        return {"pool5": pool5, "fc7": fc7, "fc8": self.fc8(fc7)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc8 logits ``(N, 101)`` of pre-processed clips ``(N, 3, 16, 112, 112)``."""
        return self.extract(x)["fc8"]


def load_c3d_mean(path) -> np.ndarray:
    """The centre crop ``mean[:, :, 8:120, 8:120]`` of ``mean2.npz`` key ``mean``: ``(3, T, 112, 112)``.

    ``mean`` must be ``(3, T, H, W)`` (BGR, T = 16 or 1, H and W >= 120) so that the crop matches
    the 112x112 C3D input.
    """
    with _open_npz(path, "C3D mean file (mean2.npz)") as data:
        if "mean" not in data.files:
            raise InputError(f"{path}: missing key 'mean' (the file has {sorted(data.files)[:8]})")
        mean = data["mean"]
    ok = mean.ndim == 4 and mean.shape[0] == 3 and mean.shape[1] in (1, 16) and min(mean.shape[2:]) >= 120
    if not ok:
        raise InputError(
            f"{path}: key 'mean' has shape {tuple(mean.shape)}, expected (3, 16, H, W) with H, W >= 120 "
            "(C, T, H, W; the protocol uses mean[:, :, 8:120, 8:120])"
        )
    return np.ascontiguousarray(mean[:, :, 8:120, 8:120], dtype=np.float32)


def load_c3d(weights, mean, device="cpu") -> C3D:
    """Build :class:`C3D` from the authors' Chainer ``conv3d_deepnetA_ucf.npz`` and ``mean2.npz``.

    ``weights`` holds ``NAME/W`` and ``NAME/b`` for conv1a..conv5b and fc6..fc8, already in
    PyTorch's ``(out, in, kT, kH, kW)`` / ``(out, in)`` order; other keys are ignored.  A missing
    file, key or a wrong shape raises :class:`InputError` naming the file and the first bad key.
    Returns the model in eval mode on ``device``, with ``model.mean`` ``(3, T, 112, 112)``.
    """
    c3d = C3D()
    with _open_npz(weights, "C3D weights (conv3d_deepnetA_ucf.npz)") as data:
        for name, layer in c3d.layers():
            for suffix, param in (("W", layer.weight), ("b", layer.bias)):
                key, expected = f"{name}/{suffix}", tuple(param.shape)
                if key not in data.files:
                    raise InputError(f"{weights}: missing key {key!r} (expected shape {expected}); "
                                     f"the file has {len(data.files)} keys, e.g. {sorted(data.files)[:4]}")
                value = data[key]
                if value.shape != expected:
                    raise InputError(f"{weights}: key {key!r} has shape {tuple(value.shape)}, expected {expected}")
                param.data.copy_(torch.from_numpy(value.astype(np.float32)))
    c3d.mean = torch.from_numpy(load_c3d_mean(mean))
    return c3d.to(device).eval()


def to_rgb(videos: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, H, W)`` with C = 1 (repeated) or 3 -> ``(N, 3, T, H, W)``."""
    if videos.dim() != 5 or videos.shape[1] not in (1, 3):
        raise InputError(f"expected videos (N, C, T, H, W) with C = 1 or 3, got {tuple(videos.shape)}")
    return videos.expand(-1, 3, -1, -1, -1) if videos.shape[1] == 1 else videos


def resize_frames(videos: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """Bilinearly resize every frame of ``(N, C, T, H, W)`` to ``(N, C, T, size, size)``."""
    if videos.shape[-2:] == (size, size):
        return videos
    frames = F.interpolate(fold_time(videos), size=(size, size), mode="bilinear", align_corners=align_corners)
    return unfold_time(frames, videos.shape[0])


def c3d_preprocess(videos: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The authors' C3D input: ``(N, C, T, H, W)`` RGB in ``[-1, 1]`` -> ``(N, 3, T, 112, 112)``.

    ``x * 128``, RGB -> BGR, every frame resized to 112x112 (bilinear, corners aligned as Chainer's
    ``resize_images``), then ``+ 128 - mean`` with ``mean`` the ``(3, T, 112, 112)`` crop.
    """
    if mean.shape[1] not in (1, videos.shape[2]):
        raise InputError(f"C3D needs {mean.shape[1]}-frame clips (the mean's length), got {videos.shape[2]} frames")
    x = to_rgb(videos).float() * 128
    x = x.flip(1)  # the Caffe-trained C3D expects BGR
    x = resize_frames(x, C3D_SIZE, align_corners=True)
    return x + (128 - mean)


@torch.no_grad()
def c3d_outputs(c3d: C3D, videos: torch.Tensor) -> Dict[str, np.ndarray]:
    """Class probabilities ``probs`` ``(N, 101)`` (softmax of fc8) and ``fc7`` ``(N, 4096)`` of raw videos."""
    out = c3d.extract(c3d_preprocess(videos, c3d.mean))
    return {"probs": F.softmax(out["fc8"].double(), dim=1).cpu().numpy(),
            "fc7": out["fc7"].double().cpu().numpy()}


# ---------------------------------------------------------------------------------------------
# I3D from a user-supplied TorchScript file (FVD)
# ---------------------------------------------------------------------------------------------


def load_i3d(path, device="cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript I3D feature extractor (``torch.jit.load``) in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: I3D TorchScript file not found")
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in recent torch, but it is the format I3D ports ship in
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # noqa: BLE001 - jit.load raises assorted types for a bad file
        raise InputError(f"{path}: not a loadable TorchScript file ({first_line(err)})") from None
    return model.eval()


def i3d_preprocess(videos: torch.Tensor, size: int = 224) -> torch.Tensor:
    """I3D input: ``(N, C, T, H, W)`` in ``[-1, 1]`` -> ``(N, 3, T, size, size)`` RGB float32 in ``[-1, 1]``.

    Frames are resized bilinearly (``align_corners=False``); the frame count is left alone.
    """
    return resize_frames(to_rgb(videos).float(), size, align_corners=False)


@torch.no_grad()
def i3d_outputs(i3d: Callable, videos: torch.Tensor, size: int = 224, kwargs: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """I3D features ``i3d`` ``(N, D)`` of raw videos: ``i3d(i3d_preprocess(videos), **kwargs)``.

    A tuple or list output contributes its first element; extra dimensions are flattened.
    """
    out = i3d(i3d_preprocess(videos, size), **(kwargs or {}))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or out.shape[0] != videos.shape[0]:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise InputError(f"I3D returned {got} for a batch of {videos.shape[0]} videos; expected (N, D) features")
    return {"i3d": out.reshape(len(out), -1).double().cpu().numpy()}


def class_accuracy(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> Dict[str, object]:
    """How often C3D's top class is the class a conditional generator was asked for.

    Returns ``{"accuracy": overall, "class_accuracy": [per class, NaN where never drawn]}``.
    """
    hits = probs.argmax(axis=1) == labels
    per_class = [float(hits[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(n_classes)]
    return {"accuracy": float(hits.mean()), "class_accuracy": per_class}


def _same_shape_groups(batch: Batch) -> Iterator[torch.Tensor]:
    # videos of different sizes cannot be stacked; the extractors resize each group to one size
    if torch.is_tensor(batch):
        yield batch
        return
    groups: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    for video in batch:
        groups[tuple(video.shape)].append(video)
    for videos in groups.values():
        yield torch.stack(videos)


def extract_features(batches: Iterable[Batch], extractors: Sequence[Callable], device,
                     total: Optional[int] = None, desc: str = "videos", progress: bool = True) -> Dict[str, np.ndarray]:
    """Run every extractor (``videos (N, C, T, H, W) -> {name: (N, ...) array}``) over all batches.

    Returns each name's outputs concatenated over the batches, e.g. ``{"probs": (N, 101), "fc7": (N, 4096)}``.
    """
    parts: Dict[str, List[np.ndarray]] = defaultdict(list)
    with tqdm(total=total, desc=desc, unit="video", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            for videos in _same_shape_groups(batch):
                videos = videos.to(device, non_blocking=True)
                for extractor in extractors:
                    for name, value in extractor(videos).items():
                        parts[name].append(value)
                bar.update(len(videos))
    return {name: np.concatenate(values) for name, values in parts.items()}


# ---------------------------------------------------------------------------------------------
# Metrics of a generator or of a set of videos
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalModels:
    """Loaded evaluation networks and the real statistics they are compared with.

    IS needs ``c3d``; FID needs ``c3d`` and ``c3d_stats`` (real fc7 ``(mu, sigma)``); FVD needs
    ``i3d`` and ``i3d_stats``.  Metrics whose pieces are missing are simply not computed.
    """

    c3d: Optional[C3D] = None
    i3d: Optional[Callable] = None
    c3d_stats: Optional[Stats] = None
    i3d_stats: Optional[Stats] = None
    i3d_size: int = 224
    i3d_kwargs: dict = field(default_factory=dict)
    device: Optional[torch.device] = None  # where videos go; default: the device of the models' weights

    def extractors(self) -> List[Callable]:
        out = []
        if self.c3d is not None:
            out.append(partial(c3d_outputs, self.c3d))
        if self.i3d is not None:
            out.append(partial(i3d_outputs, self.i3d, size=self.i3d_size, kwargs=self.i3d_kwargs))
        return out

    def input_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        for model in (self.c3d, self.i3d):
            for tensor in list(model.parameters()) + list(model.buffers()) if model is not None else []:
                return tensor.device
        return torch.device("cpu")


def _distance_to(stats: Stats, feats: np.ndarray, name: str) -> float:
    mu, sigma = feature_statistics(feats)
    if mu.shape != stats[0].shape:
        raise InputError(f"{name}: real statistics have {stats[0].shape[0]} dimensions, the features {mu.shape[0]}")
    return frechet_distance(mu, sigma, *stats)


def metrics_from_outputs(outputs: Dict[str, np.ndarray], models: EvalModels, splits: int = 1) -> Dict[str, list]:
    """Per-run scores from :func:`extract_features` outputs: ``{"IS": [per split], "FID": [x], "FVD": [x]}``."""
    scores = {}
    if "probs" in outputs:
        scores["IS"] = split_inception_scores(outputs["probs"], splits).tolist()
    if "fc7" in outputs and models.c3d_stats is not None:
        scores["FID"] = [_distance_to(models.c3d_stats, outputs["fc7"], "FID")]
    if "i3d" in outputs and models.i3d_stats is not None:
        scores["FVD"] = [_distance_to(models.i3d_stats, outputs["i3d"], "FVD")]
    return scores


def summarize(runs: Dict[str, list]) -> Dict[str, object]:
    """``{"IS": [s1, s2, ...]}`` -> ``{"IS": mean, "IS_std": std, "IS_runs": [s1, s2, ...]}``."""
    out: Dict[str, object] = {}
    for name, values in runs.items():
        out[name], out[f"{name}_std"], out[f"{name}_runs"] = float(np.mean(values)), float(np.std(values)), list(values)
    return out


def evaluate_generator(gen: nn.Module, models: EvalModels, n_samples: int = 2048, repeats: int = 1, splits: int = 1,
                       batch_size: int = 32, n_frames: int = 16, level: Optional[int] = None, seed: int = 0,
                       progress: bool = False) -> Dict[str, object]:
    """IS / FID / FVD of ``gen`` (whichever ``models`` allows), each over ``repeats`` fresh sample sets.

    Every repeat draws ``n_samples`` videos ``(n_frames, level)`` from a private RNG seeded with
    ``seed`` (the training RNG is untouched, and evaluations at different iterations see the same
    latents).  BatchNorm uses running statistics (eval mode); ``gen``'s mode is restored after.
    Returns ``{"IS": mean, "IS_std": std, "IS_runs": [...], "FID": ..., "FVD": ..., "n_samples",
    "repeats", "splits"}``; IS statistics are over all splits of all repeats (the protocol: 1
    split, 10 repeats of 2048).  A conditional generator samples uniformly drawn classes, and with
    C3D the result also has ``accuracy`` (C3D's top class = the requested class; mean over repeats)
    and ``class_accuracy`` (per class, first repeat).
    """
    device = next(gen.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    extractors = models.extractors()
    runs: Dict[str, list] = defaultdict(list)
    accuracy: Dict[str, object] = {}
    with sampling_mode(gen):
        for repeat in range(repeats):
            labels = sample_classes(gen, n_samples, rng)  # conditional: uniformly drawn classes
            batches = generated_batches(gen, n_samples, batch_size, n_frames, level, rng, labels)
            outputs = extract_features(batches, extractors, device, n_samples,
                                       f"sampling {repeat + 1}/{repeats}", progress)
            for name, values in metrics_from_outputs(outputs, models, splits).items():
                runs[name].extend(values)
            if labels is not None and "probs" in outputs:
                runs["accuracy"].append(class_accuracy(outputs["probs"], labels.numpy(), gen.cfg.n_classes)["accuracy"])
                if repeat == 0:
                    accuracy = class_accuracy(outputs["probs"], labels.numpy(), gen.cfg.n_classes)
    per_class = {"class_accuracy": accuracy["class_accuracy"]} if accuracy else {}
    return {**summarize(runs), **per_class, "n_samples": n_samples, "repeats": repeats, "splits": splits}


def score_generator_is(gen: nn.Module, c3d: C3D, n_samples: int = 2048, repeats: int = 10, batch_size: int = 32,
                       splits: int = 1, n_frames: int = 16, level: Optional[int] = None, seed: int = 0,
                       progress: bool = False) -> Tuple[float, float]:
    """The protocol's Inception Score of ``gen`` (``c3d`` on the same device): ``(mean, std)``."""
    result = evaluate_generator(gen, EvalModels(c3d=c3d), n_samples=n_samples, repeats=repeats, splits=splits,
                                batch_size=batch_size, n_frames=n_frames, level=level, seed=seed, progress=progress)
    return result["IS"], result["IS_std"]


def evaluate_videos(paths: Sequence[Path], models: EvalModels, splits: int = 1, batch_size: int = 32,
                    n_frames: int = 16, square_crop: bool = True, workers: int = 0,
                    progress: bool = True) -> Dict[str, object]:
    """IS / FID / FVD of a fixed set of video files (one run; IS statistics over ``splits``)."""
    skipped: List[Path] = []
    batches = folder_batches(paths, batch_size, n_frames, square_crop, workers, skipped)
    outputs = extract_features(batches, models.extractors(), models.input_device(), len(paths), "videos", progress)
    n_read = len(paths) - len(skipped)
    if n_read < max(2, splits):
        raise InputError(f"only {n_read} of {len(paths)} videos were readable; need at least {max(2, splits)}")
    result = summarize(metrics_from_outputs(outputs, models, splits))
    return {**result, "n_samples": n_read, "skipped": len(skipped), "splits": splits}


FEATURES = {"fc7": "c3d_fc7", "i3d": "i3d"}  # extractor output -> name recorded in statistics files


def real_statistics(models: EvalModels, feature: str, stats_path=None, real_videos=None, batch_size: int = 32,
                    n_frames: int = 16, max_videos: Optional[int] = None, seed: int = 0, square_crop: bool = True,
                    workers: int = 0, progress: bool = True) -> Stats:
    """Real-data ``(mu, sigma)`` of ``feature`` (``"fc7"`` for FID, ``"i3d"`` for FVD), cached as ``.npz``.

    An existing ``stats_path`` is read.  Otherwise the first ``n_frames`` of every video under
    ``real_videos`` (or a random ``max_videos`` of them, drawn with ``seed``) go through the
    extractor, and the statistics are written to ``stats_path`` (default
    ``stats/<folder>_<feature>_<n_frames>f.npz``) for the next run.
    """
    name = FEATURES[feature]
    if (models.c3d if feature == "fc7" else models.i3d) is None:
        raise ValueError(f"{name} statistics need the {'C3D' if feature == 'fc7' else 'I3D'} model in `models`")
    if stats_path is None and real_videos is not None:
        stats_path = Path("stats") / f"{Path(real_videos).resolve().name}_{name}_{n_frames}f.npz"
    if stats_path is not None and Path(stats_path).is_file():
        if progress:
            print(f"using cached real statistics {stats_path} (delete it to recompute)", file=sys.stderr)
        return load_statistics(stats_path, name)
    if real_videos is None:
        raise InputError(f"{stats_path}: real statistics not found; pass --real-videos DIR to compute them"
                         if stats_path else "real statistics needed: pass --real-videos DIR or --real-stats FILE")
    paths = video_paths(real_videos)
    if max_videos is not None and max_videos < len(paths):
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_videos, replace=False))
        paths = [paths[i] for i in keep]
    skipped: List[Path] = []
    only = EvalModels(c3d=models.c3d, device=models.device) if feature == "fc7" else EvalModels(
        i3d=models.i3d, i3d_size=models.i3d_size, i3d_kwargs=models.i3d_kwargs, device=models.device)
    batches = folder_batches(paths, batch_size, n_frames, square_crop, workers, skipped)
    feats = extract_features(batches, only.extractors(), only.input_device(), len(paths), f"real {name}", progress)
    if feature not in feats or len(feats[feature]) < 2:
        raise InputError(f"{real_videos}: fewer than 2 readable videos of {n_frames} frames")
    mu, sigma = feature_statistics(feats[feature])
    save_statistics(stats_path, mu, sigma, feature=name, n_videos=len(feats[feature]), skipped=len(skipped),
                    n_frames=n_frames, source=str(real_videos))
    if progress:
        print(f"wrote real statistics of {len(feats[feature])} videos to {stats_path}", file=sys.stderr)
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# Moving digits: a small digit classifier and the scores built on it
# ---------------------------------------------------------------------------------------------
#
# Offline quality numbers for 64x64 one-channel moving-digit videos.  A compact CNN, trained once
# on frames of procedural clips whose digits are known (datasets.MovingDigits.clip), says which of
# the ten digits a frame shows (multi-label) and gives a 128-d feature per frame; motion is
# measured on the pixels.  Every score is reported next to the same score of real clips.

DIGIT_CLASSIFIER_FORMAT = "tganv2-digit-classifier/2"  # bump when the network or the training recipe changes
DEFAULT_DIGIT_CLASSIFIER = Path("~/.cache/tganv2/digit_classifier.pt")
REAL_DIGITS_SEED = 2000  # the procedural real reference clips
HELD_OUT_DIGITS_SEED = 2001  # the held-out real clips of the control table
DIGIT_SIZE = 64
FIRST_DIGIT_THRESHOLD = 0.5  # presence probability the top digit needs for a frame to show any digit
SECOND_DIGIT_THRESHOLD = 0.3  # presence probability above which the runner-up digit joins a frame's set
CONTROL_BLUR_SIGMA = 1.5  # pixels, the "blurred" control
CARRY_REACH = 10  # pixels: a carried frame bounces within this distance of where it was drawn
DIGIT_SCORES = ("digit_score", "effective_digits", "identity_consistency", "adjacent_agreement", "motion",
                "diversity", "first_frame_jump", "ink_drift")


@dataclass(frozen=True)
class DigitClassifierSettings:
    """How the digit classifier is trained; a cached classifier is reused only when these match."""

    seed: int = 1000  # weights, batch order and training clips; the held-out clips use seed + 1
    n_clips: int = 3000  # procedural training clips (16 frames) ...
    frames_per_clip: int = 4  # ... each giving this many evenly spaced frames
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3  # peak of a one-cycle schedule (Adam)
    n_test_clips: int = 300  # held-out clips (all 16 frames) for the accuracy stored with the weights
    negative_fraction: float = 0.125  # extra frames showing no digit (all-zero targets), per digit frame


DIGIT_CLASSIFIER_SETTINGS = DigitClassifierSettings()  # what the command line and the training hook use


def procedural_clips(n: int, n_frames: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` procedural moving-digit clips: uint8 ``(n, 1, n_frames, 64, 64)`` and their digits int64 ``(n, 2)``.

    Clip ``i`` is ``MovingDigits.clip((i, s_i))`` with ``s_i`` the ``i``-th draw of ``default_rng(seed)``.
    """
    dataset = MovingDigits(n_frames=n_frames, size=DIGIT_SIZE)
    sample_seeds = np.random.default_rng(seed).integers(2**62, size=n)
    videos = np.empty((n, 1, n_frames, DIGIT_SIZE, DIGIT_SIZE), np.uint8)
    digits = np.empty((n, dataset.n_digits), np.int64)
    for i, sample_seed in enumerate(sample_seeds):
        video, digits[i] = dataset.clip((i, int(sample_seed)))
        videos[i] = video.numpy()
    return videos, digits


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DigitClassifier(nn.Module):
    """Which of the ten digits a frame shows: frames ``(B, 1, 64, 64)`` in ``[-1, 1]`` -> logits ``(B, 10)``.

    Four convolutions (5x5 stride 2, 3x3 stride 2, 3x3 stride 2, 3x3; BatchNorm, ReLU; receptive
    field 33 px, more than a 28 px digit) to ``(B, 128, 8, 8)``, global average pooling to the
    128-d frame feature, and one linear layer to ten independent presence logits.
    """

    n_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn_relu(1, 32, 5, 2), *_conv_bn_relu(32, 64, 3, 2),
                                  *_conv_bn_relu(64, 128, 3, 2), *_conv_bn_relu(128, self.n_features, 3, 1),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(self.n_features, 10)
        self.info: Dict[str, object] = {}  # training report (accuracy, seconds), set by the loader

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """The 128-d features ``(B, 128)`` of frames ``(B, 1, 64, 64)``."""
        # channels-last: 1.6x faster convolutions on CPU for this network
        return self.body(frames.contiguous(memory_format=torch.channels_last))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames))


def frame_digit_sets(presence: np.ndarray) -> np.ndarray:
    """Each frame's digit set as a 10-bit mask: presence probabilities ``(..., 10)`` -> int64 ``(...)``.

    The most likely digit is in the set when its probability exceeds :data:`FIRST_DIGIT_THRESHOLD`
    (else the set is empty, 0: no digit is shown); the runner-up joins it when its own probability
    exceeds :data:`SECOND_DIGIT_THRESHOLD`.  So two different digits give both, the same digit
    twice gives a set of one (where "top two" would add an arbitrary second digit that changes from
    frame to frame), and a frame never has more than two.
    """
    order = np.argsort(-presence, axis=-1, kind="stable")
    first, second = order[..., 0], order[..., 1]
    p_first, p_second = (np.take_along_axis(presence, i[..., None], axis=-1)[..., 0] for i in (first, second))
    sets = (1 << first) | np.where(p_second > SECOND_DIGIT_THRESHOLD, 1 << second, 0)
    return np.where(p_first > FIRST_DIGIT_THRESHOLD, sets, 0)


def true_digit_sets(digits: np.ndarray) -> np.ndarray:
    """The digits ``(..., n_digits)`` of clips as 10-bit masks ``(...)``."""
    return np.bitwise_or.reduce(np.left_shift(1, digits), axis=-1)


def no_digit_frames(frames: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` uint8 frames ``(n, 1, H, W)`` that show no digit, a third each of three kinds: uniform noise,
    a constant grey level, and a frame of ``frames`` (uint8 ``(M, 1, H, W)``) with its pixels shuffled
    (a digit frame's brightness without its shape).  The classifier learns all-zero targets for them,
    so noise or blank frames count as showing no digit instead of a confident arbitrary one.
    """
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 3
    out = rng.integers(0, 256, (n, *frames.shape[1:]), dtype=np.uint8)  # kind 0: noise
    out[kind == 1] = rng.integers(0, 256, (int((kind == 1).sum()), 1, 1, 1), dtype=np.uint8)
    for i in np.flatnonzero(kind == 2):
        source = frames[rng.integers(len(frames))]
        out[i] = rng.permutation(source.reshape(-1)).reshape(source.shape)
    return out


def _presence_targets(digits: np.ndarray, repeats: int) -> np.ndarray:
    targets = np.zeros((len(digits), 10), np.float32)
    targets[np.arange(len(digits))[:, None], digits] = 1.0
    return np.repeat(targets, repeats, axis=0)


@torch.no_grad()
def digit_set_accuracy(classifier: DigitClassifier, videos: np.ndarray, digits: np.ndarray,
                       batch_size: int = 32) -> float:
    """Fraction of frames whose predicted set (:func:`frame_digit_sets`) is exactly the clip's digits.

    ``videos``: uint8 ``(N, 1, T, 64, 64)``; ``digits``: ``(N, 2)``.
    """
    device = next(classifier.parameters()).device
    presence = np.concatenate([digit_frame_outputs(classifier, batch.to(device))["presence"]
                               for batch in clip_array_batches(videos, batch_size)])
    return float((frame_digit_sets(presence) == true_digit_sets(digits)[:, None]).mean())


def train_digit_classifier(settings: DigitClassifierSettings = DIGIT_CLASSIFIER_SETTINGS, device="cpu",
                           progress: bool = True) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on procedural frames with a multi-label BCE loss.

    ``settings.n_clips`` clips from ``settings.seed`` give ``frames_per_clip`` frames each, the
    target being which digits the clip holds (one or two), plus ``negative_fraction`` as many
    :func:`no_digit_frames` whose target is no digit.  Deterministic for given settings and
    device; the global RNGs are left as they were (a training run calls this).  Returns the model
    in eval mode with ``info = {"accuracy": exact-set accuracy on every frame of
    settings.n_test_clips held-out clips, "train_seconds": ...}``.
    """
    start = time.perf_counter()
    videos, digits = procedural_clips(settings.n_clips, 16, settings.seed)
    keep = np.linspace(0, 15, settings.frames_per_clip).round().astype(int)
    frames = np.ascontiguousarray(videos[:, 0, keep].reshape(-1, 1, DIGIT_SIZE, DIGIT_SIZE))
    negatives = no_digit_frames(frames, round(settings.negative_fraction * len(frames)), settings.seed + 2)
    frames = torch.from_numpy(np.concatenate([frames, negatives]))
    targets = _presence_targets(digits, settings.frames_per_clip)
    targets = torch.from_numpy(np.concatenate([targets, np.zeros((len(negatives), 10), np.float32)]))
    with torch.random.fork_rng(devices=[]):  # weight init draws from the global CPU RNG; CUDA's is not touched
        torch.random.default_generator.manual_seed(settings.seed)
        model = DigitClassifier()
    model = model.to(device).train()
    order_rng = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * math.ceil(len(frames) / settings.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps)
    with tqdm(total=steps, desc="training the digit classifier", disable=not progress, dynamic_ncols=True) as bar:
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(frames), generator=order_rng).split(settings.batch_size):
                logits = model(to_unit_range(frames[batch].to(device)))
                loss = F.binary_cross_entropy_with_logits(logits, targets[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
    model.eval()
    test_videos, test_digits = procedural_clips(settings.n_test_clips, 16, settings.seed + 1)
    model.info = {"accuracy": digit_set_accuracy(model, test_videos, test_digits),
                  "train_seconds": time.perf_counter() - start}
    return model


def save_digit_classifier(path, classifier: DigitClassifier, settings: DigitClassifierSettings) -> Path:
    """Write the weights, ``settings`` and training report to ``path`` atomically (temporary file, rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes training at once never share it
    state = {k: v.cpu() for k, v in classifier.state_dict().items()}
    torch.save({"format": DIGIT_CLASSIFIER_FORMAT, "settings": asdict(settings), "info": dict(classifier.info),
                "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


_DIGIT_CLASSIFIERS: Dict[tuple, DigitClassifier] = {}  # loaded once per process: (path, settings, device)


def load_digit_classifier(path=None, settings: DigitClassifierSettings = DIGIT_CLASSIFIER_SETTINGS, device="cpu",
                          progress: bool = True) -> DigitClassifier:
    """The digit classifier cached at ``path`` (default ``~/.cache/tganv2/digit_classifier.pt``), in eval mode.

    The file is used when it holds this format and exactly ``settings``; when it is missing,
    unreadable or was trained otherwise, a classifier is trained (:func:`train_digit_classifier`)
    and written there.  Within a process the loaded model is kept and reused.
    """
    path = Path(path or DEFAULT_DIGIT_CLASSIFIER).expanduser()
    key = (str(path.resolve()), settings, str(device))
    if key in _DIGIT_CLASSIFIERS:
        return _DIGIT_CLASSIFIERS[key]
    reason = "no cached classifier"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            reason = ("it was trained with other settings"
                      if saved.get("format") == DIGIT_CLASSIFIER_FORMAT and saved.get("settings") != asdict(settings)
                      else "" if saved.get("format") == DIGIT_CLASSIFIER_FORMAT else "it has another format")
        except Exception as err:  # noqa: BLE001 - any unreadable cache is replaced
            reason = f"it is unreadable ({type(err).__name__})"
    if not reason:
        classifier = DigitClassifier()
        classifier.load_state_dict(saved["state_dict"])
        classifier.info = dict(saved.get("info", {}))
        classifier = classifier.to(device).eval()
    else:
        if progress:
            print(f"training the digit classifier once ({reason} at {path})", file=sys.stderr)
        classifier = train_digit_classifier(settings, device, progress)
        save_digit_classifier(path, classifier, settings)
        if progress:
            print(f"digit classifier: exact-set accuracy {classifier.info['accuracy']:.4f} on held-out frames, "
                  f"trained in {classifier.info['train_seconds']:.0f} s; saved to {path}", file=sys.stderr)
    _DIGIT_CLASSIFIERS[key] = classifier
    return classifier


def as_digit_videos(videos: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, H, W)`` in ``[-1, 1]`` -> float ``(N, 1, T, 64, 64)``: RGB averaged to grey, other sizes resized."""
    if videos.dim() != 5 or videos.shape[1] not in (1, 3) or videos.shape[2] < 2:
        raise InputError(f"expected videos (N, C, T, H, W) with C = 1 or 3 and T >= 2, got {tuple(videos.shape)}")
    videos = videos.float()
    if videos.shape[1] == 3:
        videos = videos.mean(dim=1, keepdim=True)
    return resize_frames(videos, DIGIT_SIZE, align_corners=False)


def digit_centres(frames: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Centres ``(F, 2, 2)`` (two ``(x, y)`` pairs, in pixels) of the two digits of frames ``(F, H, W)`` in ``[-1, 1]``.

    Pixels brighter than mid-grey, weighted by how much brighter, are split in two by weighted
    2-means, started by cutting the ink through its centroid across its principal axis (so equal
    frames give equal centres).  Two apart digits give their own centroids; overlapping ones give
    one blob cut in two, which separates as the digits do.  An empty frame gives the frame centre.
    """
    n, h, w = frames.shape
    # ink: 0 at mid-grey and below, 1 at white; summed over 2x2 blocks (4x less work, same overall centroid)
    ink = F.avg_pool2d(frames.reshape(n, 1, h, w).float().clamp(min=0), 2).reshape(n, -1)
    ys, xs = torch.meshgrid(torch.arange(h // 2, device=frames.device) * 2.0 + 1,
                            torch.arange(w // 2, device=frames.device) * 2.0 + 1, indexing="ij")
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)  # block centres (P, 2), (x, y) in pixels
    eps = 1e-6

    def centroid(weights, fallback):  # weighted mean of the coordinates (F, 2); fallback where there is no weight
        return (weights @ coords + eps * fallback) / (weights.sum(1, keepdim=True) + eps)

    mean = centroid(ink, coords.new_tensor([w / 2, h / 2]).expand(n, 2))
    total = ink.sum(1) + eps
    variance = ink @ coords.square() / total[:, None] - mean.square()
    covariance = ink @ (coords[:, 0] * coords[:, 1]) / total - mean[:, 0] * mean[:, 1]
    angle = 0.5 * torch.atan2(2 * covariance, variance[:, 0] - variance[:, 1])  # principal axis of the ink
    axis = torch.stack([angle.cos(), angle.sin()], -1)
    second = axis @ coords.T > (mean * axis).sum(1, keepdim=True)  # (F, P)
    for _ in range(iterations + 1):
        first_ink = ink.masked_fill(second, 0)
        centres = torch.stack([centroid(first_ink, mean), centroid(ink - first_ink, mean)], 1)
        # nearer the second centre b than the first a  <=>  p . (b - a) > (|b|^2 - |a|^2) / 2
        direction = centres[:, 1] - centres[:, 0]
        second = direction @ coords.T > (centres[:, 1].square().sum(1, keepdim=True)
                                          - centres[:, 0].square().sum(1, keepdim=True)) / 2
    return centres


def clip_motion(videos: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean displacement per frame, in pixels, of the digits of clips ``(N, 1, T, H, W)`` -> ``(N,)``.

    Between consecutive frames the two :func:`digit_centres` are paired the way that moves them
    least (digits keep no labels), and the two displacements are averaged; a clip's motion is the
    mean over its ``T - 1`` steps.  Real procedural digits move 3.6 px per frame each.
    """
    n, _, t, h, w = videos.shape
    frames = videos.reshape(n * t, h, w)
    centres = torch.cat([digit_centres(part) for part in frames.split(chunk)]).view(n, t, 2, 2)
    before, after = centres[:, :-1], centres[:, 1:]
    kept = (after - before).norm(dim=-1).mean(-1)
    swapped = (after.flip(2) - before).norm(dim=-1).mean(-1)
    return torch.minimum(kept, swapped).mean(1)


@torch.no_grad()
def digit_frame_outputs(classifier: DigitClassifier, videos: torch.Tensor) -> Dict[str, np.ndarray]:
    """Classifier outputs and motion of videos ``(N, C, T, H, W)`` in ``[-1, 1]`` (see :func:`as_digit_videos`).

    Returns ``presence`` ``(N, T, 10)`` (sigmoid probabilities), ``features`` ``(N, T, 128)``,
    ``motion`` ``(N,)`` (:func:`clip_motion`) and ``ink`` ``(N, T)``, each frame's mean intensity in ``[0, 1]``.
    """
    videos = as_digit_videos(videos)
    n, _, t = videos.shape[:3]
    features = classifier.features(fold_time(videos))
    presence = torch.sigmoid(classifier.head(features))
    return {"presence": presence.view(n, t, -1).double().cpu().numpy(),
            "features": features.view(n, t, -1).double().cpu().numpy(),
            "motion": clip_motion(videos).double().cpu().numpy(),
            "ink": ((videos + 1) / 2).mean(dim=(1, 3, 4)).double().cpu().numpy()}


def digit_summary(outputs: Dict[str, np.ndarray]) -> Dict[str, object]:
    """The scores of one set of clips from :func:`digit_frame_outputs` outputs (``N >= 2`` clips).

    - ``digit_score``: ``exp(E_x KL(p(y|x) || p(y)))`` over all frames, ``p(y|x)`` the frame's
      presence probabilities normalised to sum to 1 and ``p(y)`` their mean (at most about 5: two
      sure digits give ``p(y|x)`` of entropy ln 2 and ``p(y)`` is uniform over 10; real clips 4.3).
    - ``effective_digits``: :func:`effective_digits` of the frames' digit sets: how many different
      digits the frames that show one show (10 when every digit appears equally often, 1 when all
      show the same digit, 0 when none shows a digit).  Low for a generator collapsed onto one
      legible digit, however sure the classifier is of it.
    - ``identity_consistency``: per clip, the fraction of frames whose digit set
      (:func:`frame_digit_sets`) is the clip's most frequent non-empty one; mean over clips (1 when
      digits keep their identity, 0 when no frame shows a digit).
    - ``adjacent_agreement``: the fraction of consecutive frame pairs whose digit sets are equal and
      non-empty, over all pairs of all clips.  With ``identity_consistency`` it tells flicker (a
      reading that changes from one frame to the next: both low) from drift (a digit that turns into
      another over the clip: this one high, identity low).
    - ``motion``: :func:`clip_motion`, mean over clips (pixels per frame).
    - ``diversity``: mean Euclidean distance between the clip features (frame features averaged
      over time) of all pairs of clips.
    - ``first_frame_jump``: the mean feature distance from frame 0 to frame 1 over the mean distance
      between later consecutive frames (about 1 for real clips; above 1 when frame 0 looks unlike
      the frames after it); needs ``T >= 3``.
    - ``ink_drift``: the mean intensity of the brightest frame index over the dimmest's, each averaged
      over clips (1 when brightness holds through the clip, real clips 1.01; above 1 when digits fade
      in, fade out or flash).
    - ``stats``: mean and covariance of the 128-d frame features, for the Fréchet distance.
    """
    presence, features = outputs["presence"], outputs["features"]
    n, t = presence.shape[:2]
    if n < 2:
        raise InputError(f"need at least 2 clips to score, got {n}")
    if t < 3:
        raise InputError(f"need at least 3 frames per clip to score, got {t}")
    probs = presence.reshape(n * t, -1)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    sets = frame_digit_sets(presence)
    same = (sets[:, :, None] == sets[:, None, :]) & (sets[:, :, None] != 0)  # frames without a digit never match
    dominant = same.sum(-1).max(-1) / t  # frames in each clip's most frequent (non-empty) set
    steps = np.linalg.norm(np.diff(features, axis=1), axis=-1)  # (N, T - 1) feature change between frames
    ink = outputs["ink"].mean(axis=0)  # (T,)
    return {"digit_score": float(split_inception_scores(probs)[0]),
            "effective_digits": effective_digits(sets),
            "identity_consistency": float(dominant.mean()),
            "adjacent_agreement": float(((sets[:, 1:] == sets[:, :-1]) & (sets[:, 1:] != 0)).mean()),
            "motion": float(outputs["motion"].mean()),
            "diversity": float(torch.pdist(torch.from_numpy(features.mean(axis=1))).mean()),
            "first_frame_jump": float(steps[:, 0].mean() / max(steps[:, 1:].mean(), 1e-12)),
            "ink_drift": float(ink.max() / max(ink.min(), 1e-12)),
            "stats": feature_statistics(features.reshape(n * t, -1))}


def effective_digits(sets: np.ndarray) -> float:
    """The perplexity of the digits shown by frames with digit sets ``sets`` (int64 masks, any shape).

    Each non-empty set splits one unit of weight evenly between its digits; the result is
    ``exp(entropy)`` of the normalised totals over the ten digits, in ``[1, 10]``, or 0 when every
    set is empty.
    """
    bits = (sets.reshape(-1, 1) >> np.arange(10)) & 1  # (frames, 10)
    shown = (bits / np.maximum(bits.sum(axis=1, keepdims=True), 1)).sum(axis=0)
    if shown.sum() == 0:
        return 0.0
    share = shown[shown > 0] / shown.sum()
    return float(np.exp(-(share * np.log(share)).sum()))


def summarize_digit_clips(classifier: DigitClassifier, batches: Iterable[Batch], total: Optional[int] = None,
                          desc: str = "clips", progress: bool = False) -> Dict[str, object]:
    """:func:`digit_summary` of every clip in ``batches`` (tensors ``(B, C, T, H, W)`` or lists of ``(C, T, H, W)``)."""
    device = next(classifier.parameters()).device
    outputs = extract_features(batches, [partial(digit_frame_outputs, classifier)], device, total, desc, progress)
    if not outputs:
        raise InputError(f"no {desc} to score")
    return digit_summary(outputs)


def compare_digit_summaries(fake: Dict[str, object], real: Dict[str, object]) -> Dict[str, float]:
    """The flat dict of scores of ``fake`` against ``real`` (both from :func:`digit_summary`).

    ``digit_score``, ``effective_digits``, ``identity_consistency``, ``adjacent_agreement``, ``motion``,
    ``diversity``, ``first_frame_jump`` and ``ink_drift`` of the fake clips,
    ``frechet_distance`` between their frame features, ``motion_ratio`` and ``diversity_ratio``
    (fake / real), and the real clips' own values as ``real_*``.
    """
    out = {name: fake[name] for name in DIGIT_SCORES}
    out["frechet_distance"] = frechet_distance(*fake["stats"], *real["stats"])
    out["motion_ratio"] = fake["motion"] / max(real["motion"], 1e-12)
    out["diversity_ratio"] = fake["diversity"] / max(real["diversity"], 1e-12)
    out.update({f"real_{name}": real[name] for name in DIGIT_SCORES})
    return out


def read_clip_array(path, n_frames: int, layout: str = "NTHW") -> np.ndarray:
    """Clips ``(N, C, n_frames, H, W)`` from an ``.npy`` array (memory-mapped; first ``n_frames`` frames).

    ``layout`` ``NTHW``: ``(N, T, H, W)`` or ``(N, C, T, H, W)``; ``TNHW``: Moving MNIST's
    ``(T, N, H, W)`` (``mnist_test_seq.npy``).  uint8, or float in ``[-1, 1]``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such .npy file")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable .npy array ({first_line(err)})") from None
    expected = "(T, N, H, W) like mnist_test_seq.npy" if layout == "TNHW" else "(N, T, H, W) or (N, C, T, H, W)"
    if array.ndim not in ((4,) if layout == "TNHW" else (4, 5)) or not (array.dtype == np.uint8 or array.dtype.kind == "f"):
        raise InputError(f"{path}: expected a uint8 or float array {expected}, got {array.dtype} {tuple(array.shape)}")
    if layout == "TNHW":
        array = array.transpose(1, 0, 2, 3)
    if array.ndim == 4:
        array = array[:, None]
    if array.shape[2] < n_frames:
        raise InputError(f"{path}: clips have {array.shape[2]} frames, fewer than --frames {n_frames}")
    return array[:, :, :n_frames]


def clip_array_batches(clips: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches ``(B, C, T, H, W)`` in ``[-1, 1]`` of a uint8 or float (already in ``[-1, 1]``) clip array."""
    for start in range(0, len(clips), batch_size):
        part = np.array(clips[start : start + batch_size])  # a writable copy of a memory-mapped file
        yield to_unit_range(part) if part.dtype == np.uint8 else torch.from_numpy(part).float()


def real_digit_batches(n_real: int, n_frames: int, real=None, batch_size: int = 32,
                       seed: int = REAL_DIGITS_SEED) -> Tuple[Iterator[Batch], int]:
    """The real reference clips in batches, and how many there are.

    Without ``real``: ``n_real`` procedural clips from ``seed``.  ``real`` is a Moving-MNIST-layout
    ``.npy`` (``(T, N, 64, 64)`` uint8) or a folder of videos (see :func:`datasets.video_paths`), from which
    ``n_real`` clips are drawn at random (fixed seed) when it holds more.
    """
    if real is None:
        return clip_array_batches(procedural_clips(n_real, n_frames, seed)[0], batch_size), n_real
    real = Path(real)
    if real.is_dir():
        paths = video_paths(real)
        keep = np.sort(np.random.default_rng(seed).permutation(len(paths))[:n_real])
        return folder_batches([paths[i] for i in keep], batch_size, n_frames), len(keep)
    clips = read_clip_array(real, n_frames, layout="TNHW")
    keep = np.sort(np.random.default_rng(seed).permutation(len(clips))[:n_real])
    return clip_array_batches(clips[keep], batch_size), len(keep)


# per classifier and process: the real clips are scored once
_REAL_DIGIT_SUMMARIES: "weakref.WeakKeyDictionary[DigitClassifier, Dict[tuple, dict]]" = weakref.WeakKeyDictionary()


def real_digit_summary(classifier: DigitClassifier, n_real: int = 512, n_frames: int = 16, real=None,
                       batch_size: int = 32, progress: bool = False) -> Dict[str, object]:
    """:func:`digit_summary` of the real reference clips (:func:`real_digit_batches`), computed once per process."""
    cache = _REAL_DIGIT_SUMMARIES.setdefault(classifier, {})
    key = (n_real, n_frames, None if real is None else str(Path(real).resolve()))
    if key not in cache:
        batches, count = real_digit_batches(n_real, n_frames, real, batch_size)
        cache[key] = summarize_digit_clips(classifier, batches, count, "real clips", progress)
    return cache[key]


def gaussian_blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Every frame of ``(N, C, T, H, W)`` blurred with a Gaussian of ``sigma`` pixels (edges replicated)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(videos.device)
    n, c, t, h, w = videos.shape
    frames = F.pad(videos.reshape(n * c * t, 1, h, w).float(), (radius,) * 4, mode="replicate")
    frames = F.conv2d(F.conv2d(frames, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return frames.view(n, c, t, h, w)


def carried_clips(frames: torch.Tensor, n_frames: int, speed: float, rng: torch.Generator,
                  reach: int = CARRY_REACH) -> torch.Tensor:
    """Clips ``(N, C, n_frames, H, W)`` that carry each frame of ``frames`` ``(N, C, H, W)`` (in ``[-1, 1]``)
    unchanged along a straight path.

    Each clip moves at ``speed`` pixels per frame in a direction drawn from ``rng``, by whole pixels,
    bouncing within ``reach`` pixels of where the frame was drawn; uncovered pixels are black (-1).  Frame
    0 is the frame itself.  Real digits carried so keep their reading; a glyph that reads differently a
    few pixels away does not, whatever moves it.
    """
    n, _, height, width = frames.shape
    angle = torch.rand(n, generator=rng) * (2 * math.pi)
    travel = torch.stack((angle.cos(), angle.sin()), 1)[:, None] * speed * torch.arange(n_frames)[None, :, None]
    offsets = (reach - ((travel + reach).remainder(4 * reach) - 2 * reach).abs()).round().long()  # (N, T, (x, y))
    padded = F.pad(frames, (reach,) * 4, value=-1.0)
    rows = reach - offsets[..., 1, None] + torch.arange(height)  # (N, T, H): the padded rows frame t shows
    cols = reach - offsets[..., 0, None] + torch.arange(width)
    index = torch.arange(n)[:, None, None, None]
    clips = padded.permute(0, 2, 3, 1)[index, rows[..., :, None], cols[..., None, :]]  # (N, T, H, W, C)
    return clips.permute(0, 4, 1, 2, 3).contiguous()


def control_clips(videos: torch.Tensor, kind: str, rng: torch.Generator, speed: float = 0.0) -> torch.Tensor:
    """A degraded copy of real clips ``(N, C, T, H, W)`` in ``[-1, 1]`` for the control table.

    ``kind``: ``held-out real`` (unchanged), ``blurred`` (:data:`CONTROL_BLUR_SIGMA`), ``frozen``
    (frame 0 repeated), ``shuffled`` (each clip's frames in a random order), ``noise`` (uniform) or
    ``carried`` (frame 0 moved unchanged at ``speed`` pixels per frame, :func:`carried_clips`).
    """
    if kind == "held-out real":
        return videos
    if kind == "carried":
        return carried_clips(videos[:, :, 0], videos.shape[2], speed, rng)
    if kind == "blurred":
        return gaussian_blur(videos, CONTROL_BLUR_SIGMA)
    if kind == "frozen":
        return videos[:, :, :1].expand_as(videos)
    if kind == "shuffled":
        order = torch.rand(videos.shape[0], videos.shape[2], generator=rng).argsort(dim=1)
        return torch.stack([clip[:, perm] for clip, perm in zip(videos, order)])
    if kind == "noise":
        return torch.rand(videos.shape, generator=rng) * 2 - 1
    raise ValueError(f"unknown control {kind!r}")


CONTROLS = ("held-out real", "blurred", "frozen", "shuffled", "noise", "one clip", "carried")


def digit_controls(classifier: DigitClassifier, real_summary: Dict[str, object], n_clips: int = 512,
                   n_frames: int = 16, batch_size: int = 32, progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Scores (:func:`compare_digit_summaries`, without ``real_*``) of each of :data:`CONTROLS` against ``real_summary``.

    The controls are made from ``n_clips`` held-out procedural clips (:data:`HELD_OUT_DIGITS_SEED`);
    ``one clip`` repeats the first of them ``n_clips`` times; ``carried`` moves at the real clips' speed.
    """
    held_out = procedural_clips(n_clips, n_frames, HELD_OUT_DIGITS_SEED)[0]
    rows = {}
    for kind in CONTROLS:
        rng = torch.Generator().manual_seed(0)
        if kind == "one clip":  # not a change to each clip: the first clip stands in for all of them
            batches = clip_array_batches(np.repeat(held_out[:1], n_clips, axis=0), batch_size)
        else:
            batches = (control_clips(batch, kind, rng, real_summary["motion"])
                       for batch in clip_array_batches(held_out, batch_size))
        scores = compare_digit_summaries(summarize_digit_clips(classifier, batches, n_clips, kind, progress),
                                         real_summary)
        rows[kind] = {k: v for k, v in scores.items() if not k.startswith("real_")}
    return rows


def recurrent_z_share(gen: nn.Module, z: torch.Tensor, n_frames: int = 16) -> torch.Tensor:
    """Per frame ``(n_frames,)``: the share of the ConvLSTM output's mean square that varies between the latents
    ``z`` ``(N, z_dim)``.  1 means z alone sets the frame's state; 0 means every sample gets the same state, so
    what a frame shows depends on its index only."""
    with torch.no_grad():
        _, states = gen.recurrent_states(z, n_frames)  # (N, T, C, h, w)
    states = states.float()
    between = states.var(0, unbiased=False).mean(dim=(1, 2, 3))
    return between / states.pow(2).mean(dim=(0, 2, 3, 4)).clamp_min(1e-12)


def warp_statistics(gen: nn.Module, z: torch.Tensor, n_frames: int = 16,
                    labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """How a motion-warp generator (``cfg.motion_warp``) uses its flow, per frame, at the last level's size.

    ``z`` ``(N, z_dim)``.  Returns ``shift`` ``(n_frames,)``: the mean distance in pixels from a pixel to where
    it reads the content map; and ``distortion`` ``(n_frames,)``: the mean ``|det J - 1|`` of the map from a
    pixel to where it reads, ``J`` its Jacobian by finite differences.  A glyph carried along unchanged (a
    translation) has distortion 0 at any shift; a distortion of 1 means areas double or vanish.  ``shared``
    ``(n_frames,)``: the part of the flow's energy (mean squared displacement) that its mean over the clips
    carries, 1 when every clip gets the same flow (a fixed lens), 0 when the clips' flows cancel out.
    """
    if not gen.cfg.motion_warp:
        raise ValueError("warp statistics need a motion-warp generator (cfg.motion_warp)")
    size = gen.cfg.resolutions[-1]
    with torch.no_grad():
        _, flow = gen.content_and_flow(z, n_frames, labels)  # (N, T, 2, h, w), 2 units = the frame's width
    n, t = flow.shape[:2]
    flow = F.interpolate(flow.float().reshape(n * t, 2, *flow.shape[-2:]), size=(size, size), mode="bilinear",
                         align_corners=False).view(n, t, 2, size, size) * (size / 2)
    d_dx = flow[..., :-1, 1:] - flow[..., :-1, :-1]  # (N, T, 2, H - 1, W - 1): change per pixel along x
    d_dy = flow[..., 1:, :-1] - flow[..., :-1, :-1]
    det = (1 + d_dx[:, :, 0]) * (1 + d_dy[:, :, 1]) - d_dy[:, :, 0] * d_dx[:, :, 1]
    energy = flow.square().sum(2).mean(dim=(0, 2, 3))
    shared = flow.mean(0).square().sum(1).mean(dim=(1, 2)) / energy.clamp_min(1e-12)
    return {"shift": flow.norm(dim=2).mean(dim=(0, 2, 3)), "distortion": (det - 1).abs().mean(dim=(0, 2, 3)),
            "shared": shared}


def digit_metrics_for_generator(gen: nn.Module, n_samples: int = 512, n_frames: int = 16, seed: int = 0,
                                device=None, batch_size: int = 32, bn_mode: str = "eval",
                                level: Optional[int] = None, n_real: int = 512, real=None, classifier_path=None,
                                settings: DigitClassifierSettings = DIGIT_CLASSIFIER_SETTINGS,
                                progress: bool = False) -> Dict[str, float]:
    """Moving-digit scores of ``n_samples`` dense samples of ``gen`` against real clips: a flat dict of floats.

    Keys: ``digit_score``, ``effective_digits``, ``identity_consistency``, ``adjacent_agreement``,
    ``frechet_distance``, ``motion``, ``motion_ratio``, ``diversity``, ``diversity_ratio``, ``first_frame_jump``,
    ``ink_drift``, the real clips' ``real_*`` of each score without a ratio or distance (see :func:`digit_summary`),
    ``recurrent_z_share``, :func:`recurrent_z_share` at the last frame (up to 256 of the latents), and for a
    motion-warp generator ``warp_shift``, ``warp_distortion`` and ``warp_shared``, :func:`warp_statistics` averaged
    over frames (the same latents), and ``carried_identity``: the identity consistency of ``n_samples`` still frames
    (``Generator.still_frame``, fresh latents) carried unchanged at the real clips' speed (:func:`carried_clips`; real
    digits: the ``carried`` control), about the most any motion that keeps a glyph's shape could score with these
    glyphs. Samples ``(n_samples, C, n_frames, H, W)`` come from a private RNG seeded with
    ``seed`` (the training RNGs are untouched; every call sees the same latents) in :func:`sampling_mode`
    ``bn_mode``; ``gen``'s modes and BatchNorm statistics are restored. The classifier
    (:func:`load_digit_classifier`, on ``device``, default ``gen``'s) and the real statistics
    (:func:`real_digit_summary`) are loaded or computed on the first call only.
    """
    device = torch.device(device) if device is not None else next(gen.parameters()).device
    classifier = load_digit_classifier(classifier_path, settings, device, progress)
    real_summary = real_digit_summary(classifier, n_real, n_frames, real, batch_size, progress)
    rng = torch.Generator(device=next(gen.parameters()).device).manual_seed(seed)
    with sampling_mode(gen, bn_mode):
        labels = sample_classes(gen, n_samples, rng)
        batches = generated_batches(gen, n_samples, batch_size, n_frames, level, rng, labels)
        summary = summarize_digit_clips(classifier, batches, n_samples, "sampling", progress)
        z = gen.sample_z(min(n_samples, 256), generator=rng)
        share = recurrent_z_share(gen, z, n_frames)[-1].item()
        inside = {"recurrent_z_share": share}
        if gen.cfg.motion_warp:
            warp = warp_statistics(gen, z, n_frames, sample_classes(gen, len(z), rng))
            inside.update({f"warp_{name}": per_frame.mean().item() for name, per_frame in warp.items()})
            still = generated_batches(gen, n_samples, batch_size, rng=rng, still=True,
                                      labels=sample_classes(gen, n_samples, rng))
            paths = torch.Generator().manual_seed(seed)  # on the CPU, whatever the generator's device
            carried = (carried_clips(frames.cpu(), n_frames, real_summary["motion"], paths) for frames in still)
            inside["carried_identity"] = summarize_digit_clips(
                classifier, carried, n_samples, "carried still frames", progress)["identity_consistency"]
    return {**compare_digit_summaries(summary, real_summary), **inside}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"return_features\": true}'")
    return value


def add_digits_parser(sub) -> argparse.ArgumentParser:
    """The ``digits`` subcommand: the moving-digit scores (no downloads, no external weights)."""
    help_text = ("moving digits: digit score, effective digits, identity consistency, "
                 "Fréchet distance of digit-classifier features, motion and diversity, each next to real clips")
    cmd = sub.add_parser("digits", help=help_text, description=help_text + ". The classifier is trained once "
                         "(about 1-2 minutes on 2 CPU cores) and cached at --classifier.")
    source = cmd.add_argument_group("videos to score (one of; none with --controls)")
    pick = source.add_mutually_exclusive_group()
    pick.add_argument("--checkpoint", metavar="CKPT",
                      help="training checkpoint or G-only snapshot; its generator samples --n-samples dense videos")
    pick.add_argument("--videos", metavar="DIR",
                      help="folder of .gif/.mp4/.avi/.mov/.mkv/.webm/uint8 .npy videos (recursive, grid.* skipped)")
    pick.add_argument("--npy", metavar="FILE",
                      help="one .npy array of clips, (N, T, H, W) or (N, C, T, H, W), uint8 or float in [-1, 1]")
    source.add_argument("--controls", action="store_true",
                        help="instead, print the control table: held-out real, blurred, frozen, shuffled, noise and "
                             "one-clip-repeated clips (made from --n-real held-out procedural clips), each scored "
                             "against the real clips")
    opts = cmd.add_argument_group("scoring options")
    opts.add_argument("--n-samples", type=positive_int, default=None,
                      help="clips to score: default 512 from a checkpoint; from --videos/--npy the first N (default all)")
    opts.add_argument("--n-real", type=positive_int, default=512,
                      help="real reference clips (default 512): procedural clips from a fixed seed, or a seeded "
                           "random subset of --real")
    opts.add_argument("--real", metavar="PATH",
                      help="real clips instead of procedural ones: a Moving-MNIST-layout .npy (T, N, 64, 64) uint8 "
                           "such as mnist_test_seq.npy, or a folder of videos")
    opts.add_argument("--frames", type=positive_int, default=16, help="frames per clip, at least 3 (default 16)")
    opts.add_argument("--level", type=positive_int, default=None,
                      help="generator level to render (1-based; default the last); frames are resized to 64x64")
    opts.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                      help="generator BatchNorm at sampling time: running statistics (eval, default) or the "
                           "statistics of each --batch-size batch (train)")
    add_sampling_arguments(opts)
    opts.add_argument("--classifier", metavar="PATH", default=str(DEFAULT_DIGIT_CLASSIFIER),
                      help="cached digit classifier: used when it matches this version's training settings, "
                           "else trained and written here (default %(default)s)")
    opts.add_argument("--batch-size", type=positive_int, default=32, help="clips per forward pass (default 32)")
    opts.add_argument("--seed", type=int, default=0, help="seed of the generator's latents (default 0)")
    opts.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    opts.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding video files (default 0)")
    opts.add_argument("--json", action="store_true", help="print the results as one JSON object")
    opts.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")
    return cmd


def run_digits(args: argparse.Namespace) -> Dict[str, object]:
    """The ``digits`` subcommand: scores of the clips ``args`` names (or the control table) as a dict."""
    if not (args.checkpoint or args.videos or args.npy or args.controls):
        raise InputError("digits: give --checkpoint CKPT, --videos DIR or --npy FILE (or --controls)")
    if args.controls and (args.checkpoint or args.videos or args.npy):
        raise InputError("--controls scores held-out real clips: leave out --checkpoint/--videos/--npy")
    if args.frames < 3:
        raise InputError(f"--frames {args.frames}: the scores need at least 3 frames")
    if args.level is not None and not args.checkpoint:
        raise InputError("--level applies to --checkpoint only")
    device = pick_device(args.device)
    progress = not args.quiet
    # cheap checks first: the classifier may need training
    if args.checkpoint:
        gen, ckpt = load_generator(args.checkpoint, device, **sampling_overrides(args))
        if args.level is not None and args.level > gen.n_levels:
            raise InputError(f"--level {args.level}: the generator has levels 1..{gen.n_levels}")
    elif args.videos:
        paths = video_paths(args.videos)[: args.n_samples]
    elif args.npy:
        clips = read_clip_array(args.npy, args.frames)[: args.n_samples]
    if args.real is not None and not Path(args.real).exists():
        raise InputError(f"--real {args.real}: no such file or folder")
    classifier = load_digit_classifier(args.classifier, DIGIT_CLASSIFIER_SETTINGS, device, progress)
    real = real_digit_summary(classifier, args.n_real, args.frames, args.real, args.batch_size, progress)
    info = {"metric": "digits", "classifier_accuracy": classifier.info.get("accuracy"), "n_real": args.n_real,
            "real": args.real or "procedural", "frames": args.frames}
    if args.controls:
        rows = digit_controls(classifier, real, args.n_real, args.frames, args.batch_size, progress)
        return {**info, "controls": {"real (reference)": {k: real[k] for k in DIGIT_SCORES}, **rows}}
    if args.checkpoint:
        n_samples = args.n_samples or 512
        result = digit_metrics_for_generator(gen, n_samples, args.frames, args.seed, device, args.batch_size,
                                             args.bn_mode, args.level, args.n_real, args.real, args.classifier,
                                             DIGIT_CLASSIFIER_SETTINGS, progress)
        info.update(source=str(args.checkpoint), iteration=ckpt.get("iteration"), bn_mode=args.bn_mode,
                    rigid_cells=gen.cfg.rigid_cells, still_first_frame=gen.cfg.still_first_frame,
                    wall_bounce=gen.cfg.wall_bounce, seed=args.seed,
                    glyph_average="generator_average" in ckpt and not args.raw_weights)
    else:
        if args.videos:
            skipped: List[Path] = []
            batches = folder_batches(paths, args.batch_size, args.frames, True, args.workers, skipped)
            summary = summarize_digit_clips(classifier, batches, len(paths), "videos", progress)
            n_samples, info["skipped"] = len(paths) - len(skipped), len(skipped)
        else:
            n_samples = len(clips)
            summary = summarize_digit_clips(classifier, clip_array_batches(clips, args.batch_size), n_samples,
                                            "clips", progress)
        result = compare_digit_summaries(summary, real)
        info["source"] = str(args.videos or args.npy)
    return {**info, "n_samples": n_samples, **result}


def format_digits(result: Dict[str, object]) -> str:
    """The ``digits`` result as a small table (or the control table in Markdown)."""
    head = (f"digit classifier: exact-set accuracy {result['classifier_accuracy']:.4f}; real clips: "
            f"{result['n_real']} {result['real']}, {result['frames']} frames")
    columns = ("digit_score", "effective_digits", "identity_consistency", "adjacent_agreement",
               "frechet_distance", "motion", "motion_ratio", "diversity", "diversity_ratio", "ink_drift")
    if "controls" in result:
        lines = ["| clips | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, row in result["controls"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in columns) + " |")
        return head + "\n" + "\n".join(lines)
    source = f"{result['source']}: {result['n_samples']} clips"
    if "bn_mode" in result:
        source += (f" (iteration {result['iteration']}, BatchNorm {result['bn_mode']}, "
                   f"rigid cells {result['rigid_cells']}"
                   + (", still first frame" if result.get("still_first_frame") else "")
                   + (", wall bounce" if result.get("wall_bounce") else "")
                   + (", glyph average" if result.get("glyph_average") else "") + ")")
    if result.get("skipped"):
        source += f", {result['skipped']} unreadable skipped"
    lines = [f"{'score':<22}{'clips':>10}{'real':>10}"]
    inside = tuple(k for k in result if k in ("recurrent_z_share", "carried_identity") or k.startswith("warp_"))
    for name in columns + inside:
        real = result.get(f"real_{name}")
        lines.append(f"{name:<22}{result[name]:>10.4f}" + (f"{real:>10.4f}" if real is not None else ""))
    return "\n".join([head, source, *lines])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_argument_group("videos to score (one of)")
    pick = source.add_mutually_exclusive_group(required=True)
    pick.add_argument("--checkpoint", metavar="CKPT",
                      help="training checkpoint or G-only snapshot; its generator samples the videos (eval mode, "
                           "BatchNorm running stats)")
    pick.add_argument("--videos", metavar="DIR",
                      help="folder of .gif/.mp4/.avi/.mov/.mkv/.webm/uint8 .npy videos (searched recursively, "
                           "grid.* skipped); the first --frames frames of each are used")
    opts = common.add_argument_group("sampling and run options")
    opts.add_argument("--n-samples", type=positive_int, default=None,
                      help="videos per run: default 2048 from a checkpoint; all files of --videos")
    opts.add_argument("--frames", type=positive_int, default=16,
                      help="frames per video (default 16; C3D needs 16)")
    opts.add_argument("--level", type=positive_int, default=None,
                      help="generator level to render (1-based; default the last, full resolution)")
    opts.add_argument("--batch-size", type=positive_int, default=32, help="videos per forward pass (default 32)")
    opts.add_argument("--seed", type=int, default=0,
                      help="seed of the latents (and of the --max-real subset); default 0")
    opts.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    opts.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding video files (default 0)")
    opts.add_argument("--no-square-crop", dest="square_crop", action="store_false",
                      help="feed non-square video files whole instead of their central square "
                           "(generated videos are square)")
    opts.add_argument("--json", action="store_true", help="print the results as one JSON object")
    opts.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")

    c3d = argparse.ArgumentParser(add_help=False)
    group = c3d.add_argument_group("C3D (UCF-101 fine-tuned, the authors' Chainer files)")
    group.add_argument("--c3d-weights", required=True, metavar="NPZ",
                       help="conv3d_deepnetA_ucf.npz: keys conv1a/W, conv1a/b, ..., fc8/W, fc8/b")
    group.add_argument("--c3d-mean", required=True, metavar="NPZ",
                       help="mean2.npz: key 'mean', BGR (3, 16, H, W) with H, W >= 120; mean[:, :, 8:120, 8:120] is used")

    i3d = argparse.ArgumentParser(add_help=False)
    group = i3d.add_argument_group("I3D (Kinetics-400, TorchScript)")
    group.add_argument("--i3d", required=True, metavar="PT",
                       help="TorchScript feature extractor, called as i3d(x, **I3D_KWARGS) with x float32 "
                            "(N, 3, T, S, S), RGB in [-1, 1], T = --frames, S = --i3d-size, frames resized "
                            "bilinearly; must return (N, D) features (a tuple's first item is used)")
    group.add_argument("--i3d-size", type=positive_int, default=224, help="frame size fed to I3D (default 224)")
    group.add_argument("--i3d-kwargs", type=_json_object, default={}, metavar="JSON",
                       help="extra keyword arguments for the call, e.g. "
                            "'{\"rescale\": false, \"resize\": false, \"return_features\": true}'")

    real = argparse.ArgumentParser(add_help=False)
    group = real.add_argument_group("real-data reference statistics")
    group.add_argument("--real-stats", metavar="NPZ",
                       help="cached (mu, sigma) .npz; read if it exists, else computed from --real-videos and "
                            "written here (default stats/<folder>_<feature>_<frames>f.npz)")
    group.add_argument("--real-videos", metavar="DIR",
                       help="folder of real videos (e.g. UCF-101/), first --frames frames of each")
    group.add_argument("--max-real", type=positive_int, default=None,
                       help="use a random subset of this many real videos (default all)")

    parser = OneLineArgumentParser(
        prog="evaluate.py",
        description="Inception Score / FID (C3D, UCF-101) and FVD (I3D) of a TGANv2 checkpoint or a folder of videos.",
        epilog="Errors about missing or malformed files are printed as one line with exit status 1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{is,fid,fvd,digits}")
    for name, parents, repeats, help_text in (
        ("is", [common, c3d], 10, "Inception Score: softmax of C3D fc8; protocol 2048 samples, 1 split, 10 repeats"),
        ("fid", [common, c3d, real], 1, "FID: Fréchet distance of C3D fc7 features to the real statistics"),
        ("fvd", [common, i3d, real], 1, "FVD: Fréchet distance of I3D features to the real statistics"),
    ):
        cmd = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
        cmd.add_argument("--repeats", type=positive_int, default=None,
                         help=f"fresh sample sets drawn from --checkpoint, reported as mean ± std (default {repeats}); "
                              "a --videos folder is scored once")
        if name == "is":
            cmd.add_argument("--splits", type=positive_int, default=1,
                             help="splits per sample set; the score's std is over all splits of all repeats (default 1)")
    add_digits_parser(sub)
    return parser


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Load what ``args`` names, score, and return the results of ``args.command``."""
    if args.command == "digits":
        return run_digits(args)
    device = pick_device(args.device)
    progress = not args.quiet
    metric = {"is": "IS", "fid": "FID", "fvd": "FVD"}[args.command]
    # cheap checks first: the C3D weights take a while to load
    if args.checkpoint:
        gen, ckpt = load_generator(args.checkpoint, device)
        if args.level is not None and args.level > gen.n_levels:
            raise InputError(f"--level {args.level}: the generator has levels 1..{gen.n_levels}")
    else:
        if args.level is not None:
            raise InputError("--level applies to --checkpoint only")
        paths = video_paths(args.videos)[: args.n_samples]
    if args.command != "is" and not (args.real_stats or args.real_videos):
        raise InputError(f"{metric} needs real statistics: pass --real-videos DIR or --real-stats FILE")
    models = EvalModels(device=device)
    if args.command in ("is", "fid"):
        models.c3d = load_c3d(args.c3d_weights, args.c3d_mean, device)
    else:
        models.i3d = load_i3d(args.i3d, device)
        models.i3d_size, models.i3d_kwargs = args.i3d_size, args.i3d_kwargs
    if args.command != "is":
        stats = real_statistics(models, "fc7" if args.command == "fid" else "i3d", args.real_stats, args.real_videos,
                                batch_size=args.batch_size, n_frames=args.frames, max_videos=args.max_real,
                                seed=args.seed, square_crop=args.square_crop, workers=args.workers, progress=progress)
        if args.command == "fid":
            models.c3d_stats = stats
        else:
            models.i3d_stats = stats
    splits = getattr(args, "splits", 1)
    if args.checkpoint:
        repeats = args.repeats or (10 if args.command == "is" else 1)
        result = evaluate_generator(gen, models, n_samples=args.n_samples or 2048, repeats=repeats,
                                    splits=splits, batch_size=args.batch_size, n_frames=args.frames,
                                    level=args.level, seed=args.seed, progress=progress)
        result.update(source=str(args.checkpoint), iteration=ckpt.get("iteration"))
    else:
        if (args.repeats or 1) > 1 and progress:
            print(f"note: a folder is scored once; --repeats {args.repeats} ignored", file=sys.stderr)
        result = evaluate_videos(paths, models, splits=splits, batch_size=args.batch_size, n_frames=args.frames,
                                 square_crop=args.square_crop, workers=args.workers, progress=progress)
        result["source"] = str(args.videos)
    keep = {metric, f"{metric}_std", f"{metric}_runs", "n_samples", "repeats", "splits", "skipped", "source", "iteration"}
    return {"metric": metric, **{k: v for k, v in result.items() if k in keep}}


def format_result(result: Dict[str, object]) -> str:
    """One human-readable line, e.g. ``IS 24.31 ± 0.45 (10 x 2048 samples, 1 split) runs/x.pt``."""
    metric = result["metric"]
    value = f"{metric} {result[metric]:.4f}"
    if len(result[f"{metric}_runs"]) > 1:
        value += f" ± {result[f'{metric}_std']:.4f}"
    runs = f"{result['repeats']} x " if result.get("repeats", 1) > 1 else ""
    detail = f"{runs}{result['n_samples']} samples"
    if metric == "IS":
        detail += f", {result['splits']} split{'s' if result['splits'] > 1 else ''}"
    if result.get("skipped"):
        detail += f", {result['skipped']} unreadable skipped"
    if "accuracy" in result:  # conditional generator scored with C3D
        detail += f", uniformly drawn classes; C3D accuracy {100 * result['accuracy']:.1f}%"
    return f"{value} ({detail}) {result['source']}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (InputError, OSError) as err:  # bad input, or a full or read-only disk while caching statistics
        return report_error("evaluate.py", err)
    text = format_digits(result) if args.command == "digits" else format_result(result)
    print(json.dumps(result) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
