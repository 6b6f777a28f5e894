"""Losses, the R1 penalty, video grids (GIF/MP4), checkpoints, seeding and device helpers."""

import argparse
import contextlib
import errno
import json
import math
import os
import pickle
import shutil
import struct
import sys
from collections import defaultdict
from fractions import Fraction
import random
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

class InputError(ValueError):
    """A missing or malformed input file or flag; the CLI prints it as one line, no traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: error: ...``, see --help), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_error(prog: str, error: Union[BaseException, str]) -> int:
    """Print bad input as the scripts' one line, ``PROG: error: MESSAGE``, and return the exit status 1.

    An ``OSError`` from the system (a full or read-only disk) names its file and the reason.  The
    line goes through tqdm so that it lands below a progress bar, not inside it.
    """
    from tqdm import tqdm

    message = describe_os_error(error) if isinstance(error, OSError) and error.strerror else str(error)
    tqdm.write(f"{prog}: error: {message}", file=sys.stderr)
    return 1


# argparse types: a bad value is a one-line usage error naming the flag ---------------------------


def int_list(text: str) -> List[int]:
    """``"2,2,2"`` -> ``[2, 2, 2]``."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,2,2, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_sampling_arguments(parser) -> None:
    """``--rigid-cells N``, ``--still-first-frame``, ``--wall-bounce`` and ``--raw-weights`` for the sampling scripts:
    they override the checkpoint's ``ModelConfig.rigid_cells``, ``.still_first_frame`` and ``.wall_bounce`` and drop
    its glyph-path average (see :func:`models.load_generator`, :func:`sampling_overrides`)."""
    parser.add_argument("--rigid-cells", type=non_negative_int, default=None, metavar="N",
                        help="motion-warp checkpoints: draw frame 0 with its flow (or as the still frame: "
                             "--still-first-frame), then carry it to each later frame by one displacement per cell "
                             "of an N x N grid, so glyphs keep their shape; 0 = every frame from its own flow "
                             "(default: the checkpoint's setting: 1 for runs of the tuned recipe since one cell became "
                             "its default, 2 for its runs from the setting's start until then, 0 before)")
    parser.add_argument("--still-first-frame", action=argparse.BooleanOptionalAction, default=None,
                        help="with rigid cells: frame 0 is the clip's map unmoved (the still frame the frame warm-up "
                             "trains) instead of the map moved by frame 0's flow; the later frames carry it as "
                             "before (default: the checkpoint's setting, on for runs of the tuned recipe since it "
                             "was added, off before)")
    parser.add_argument("--wall-bounce", action=argparse.BooleanOptionalAction, default=None,
                        help="with rigid cells: fold each cell's displacement back at the frame's walls, so the "
                             "clip's glyphs bounce off them as real moving digits do instead of leaving the frame "
                             "(default: the checkpoint's setting, on for runs of the tuned recipe since it was "
                             "added, off before)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="use G's trained weights even where the run kept an average of the glyph path "
                             "(--glyph-average, on in the tuned recipe), which is used by default")


def sampling_overrides(args) -> dict:
    """The keyword arguments of :func:`models.load_generator` that :func:`add_sampling_arguments`' flags set."""
    return dict(rigid_cells=args.rigid_cells, raw_weights=args.raw_weights,
                still_first_frame=args.still_first_frame, wall_bounce=args.wall_bounce)


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in ``[0, 1)``: Adam's betas, an average's decay."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# Losses (docs/METHOD.md, 'Training step')
# ---------------------------------------------------------------------------------------------


def generator_loss(y_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating loss ``mean(softplus(-D(G(z))))`` in fp32."""
    return F.softplus(-y_fake.float()).mean()


def discriminator_loss(y_real: torch.Tensor, y_fake: torch.Tensor) -> torch.Tensor:
    """``mean(softplus(-D(x))) + mean(softplus(D(G(z))))`` in fp32."""
    return F.softplus(-y_real.float()).mean() + F.softplus(y_fake.float()).mean()


def r1_penalty(y_real: torch.Tensor, real_levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-centred gradient penalty ``sum_levels sum(||dD/dx_level||^2)`` (a sum over the batch).

    ``real_levels`` must require grad and ``y_real`` must have been computed from them.  The
    graph is kept (``create_graph=True``) so the penalty can be back-propagated into D.
    """
    grads = torch.autograd.grad(y_real.float().sum(), list(real_levels), create_graph=True)
    return sum(g.float().pow(2).sum() for g in grads)


def lower_render_loss(lower: Sequence[torch.Tensor], frame: torch.Tensor) -> torch.Tensor:
    """Summed mean squared error of each lower-level render ``(N, C, r_l, r_l)`` against ``frame``
    ``(N, C, H, W)`` average-pooled to ``r_l`` (how the real pyramid down-samples), in fp32."""
    frame = frame.float()
    return sum(F.mse_loss(x.float(), F.avg_pool2d(frame, frame.shape[-1] // x.shape[-1])) for x in lower)


# ---------------------------------------------------------------------------------------------
# Video grids
# ---------------------------------------------------------------------------------------------


def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` videos ``(N, C, T, H, W)`` to uint8 ``(N, T, H, W, C)``."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def make_grid(videos: torch.Tensor, nrow: int = 8, padding: int = 1) -> np.ndarray:
    """Tile ``(N, C, T, H, W)`` videos in ``[-1, 1]`` into uint8 frames ``(T, rows*H', nrow*W', C)``.

    ``padding`` black pixels separate the tiles; missing tiles of the last row stay black.
    """
    frames = to_uint8(videos)
    n, t, h, w, c = frames.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.zeros((t, nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = frames[i]
    return grid


def write_video(path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write uint8 frames ``(T, H, W, C)`` (C = 1 or 3) as GIF, MP4 or a PNG strip, by extension.

    The file is written to a temporary name and renamed, so readers never see half a file; on
    failure (a full disk) the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4", ".png"):
        raise ValueError(f"{path}: unsupported video format {suffix!r}; expected .gif, .mp4 or .png")
    try:
        if suffix == ".gif":
            encode_gif(tmp, frames, fps)
        elif suffix == ".mp4":
            encode_video(tmp, frames, fps, container_format="mp4")  # the temporary name hides the extension
        else:
            import imageio.v3 as iio

            strip = np.concatenate(list(frames), axis=1)  # frames side by side
            iio.imwrite(tmp, strip[..., 0] if strip.shape[-1] == 1 else strip, extension=".png")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep a partial file
            tmp.unlink()
        raise
    return path


def gif_palette(frames: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Palette indices ``(T, H, W)`` and one shared 256-colour RGB palette ``(256, 3)`` of uint8 frames ``(T, H, W, C)``.

    Grayscale frames keep their exact values (the palette is the gray ramp).  RGB frames share one
    palette (colours do not flicker between frames), built by Pillow's max-coverage quantizer from
    at most 65536 evenly spread pixels (a second for an 8x8 grid of 64 px videos) and applied to
    every pixel without dithering.
    """
    if frames.shape[-1] == 1:
        return frames[..., 0], np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    from PIL import Image

    t, h, w, _ = frames.shape
    pixels = frames.reshape(-1, 3)
    sample = pixels[:: max(1, len(pixels) // 65536)]
    sample = np.concatenate([sample, sample[: -len(sample) % 256]])  # rows of 256 pixels
    quantizer = Image.fromarray(sample.reshape(-1, 256, 3)).quantize(256, method=Image.Quantize.MAXCOVERAGE,
                                                                         dither=Image.Dither.NONE)
    mosaic = Image.fromarray(np.ascontiguousarray(frames).reshape(t * h, w, 3))
    indices = mosaic.quantize(palette=quantizer, dither=Image.Dither.NONE)
    palette = np.zeros((256, 3), np.uint8)
    used = np.array(quantizer.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    palette[: len(used)] = used
    return np.asarray(indices).reshape(t, h, w), palette


def encode_gif(path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 frames ``(T, H, W, C)`` (C = 1 or 3) as a looping GIF with PyAV, one GIF frame per frame.

    Pillow's writer merges identical consecutive frames (a 24-frame video with one repeat reads
    back as 23); FFmpeg's encoder, with frame differencing off, keeps every frame whole.
    """
    import av

    indices, palette = gif_palette(frames)
    argb = np.concatenate([np.full((256, 1), 255, np.uint8), palette], axis=1)  # PyAV's pal8 layout
    with av.open(str(path), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = indices.shape[1:3]
        stream.pix_fmt = "pal8"
        stream.codec_context.options = {"gifflags": "-offsetting-transdiff"}  # whole, opaque frames
        for pts, image in enumerate(indices):
            frame = av.VideoFrame.from_ndarray((np.ascontiguousarray(image), argb), format="pal8")
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path)


def encode_video(path, frames: np.ndarray, fps: float, codec: Optional[str] = None, container_format=None,
                 **codec_options) -> Path:
    """Encode uint8 frames ``(T, H, W, C)`` (C = 1 or 3) with PyAV (FFmpeg inside the wheel).

    ``codec`` defaults to H.264 where available, else MPEG-4; the container follows the extension
    unless ``container_format`` is given.  ``codec_options``: ``bit_rate``, ``gop_size``,
    ``max_b_frames``.  Odd sizes are padded by one black row/column (yuv420p needs even sizes).
    """
    import av

    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if "bit_rate" in codec_options:
            stream.bit_rate = codec_options.pop("bit_rate")
        for name, value in codec_options.items():
            setattr(stream.codec_context, name, value)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def save_video_grid(videos: torch.Tensor, path, nrow: int = 8, fps: float = 8.0) -> Path:
    """Save ``(N, C, T, H, W)`` videos in ``[-1, 1]`` as one animated grid (GIF or MP4 by extension)."""
    return write_video(path, make_grid(videos, nrow), fps)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, would hold non-finite values, or cannot be written (one-line message)."""


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or infinite values (a diverged run): nothing was written."""


class CheckpointWriteError(CheckpointError):
    """The filesystem refused a checkpoint (full, read-only, ...): the partial file is gone, the old ones intact."""

    def __init__(self, message: str, errno_: Optional[int] = None):
        super().__init__(message)
        self.errno = errno_


def previous_checkpoint_path(path) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def temporary_checkpoint_path(path) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.pt.tmp``, where a save writes before renaming."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def discard_torn_checkpoint(path) -> bool:
    """Remove ``path``'s ``*.pt.tmp`` if it is a torn write (not a complete zip); True if one was removed.

    A complete one is kept: :func:`load_checkpoint` uses it when it is newer than ``path``.
    """
    tmp = temporary_checkpoint_path(path)
    if not tmp.exists() or _is_complete_zip(tmp):
        return False
    try:
        tmp.unlink()
    except OSError:  # gone already, or not ours to remove: the loader skips a torn file anyway
        return False
    return True


def rejected_checkpoint_path(path) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.bad.pt``: where a resume moves an unusable latest checkpoint."""
    path = Path(path)
    return path.with_name(path.stem + ".bad" + path.suffix)


def floating_tensors(state, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """Every floating-point tensor in nested dicts, lists and tuples, named like ``opt_g.state.3.exp_avg``."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from floating_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_entries(state, limit: int = 3) -> List[str]:
    """Names of up to ``limit`` floating tensors of ``state`` (any nesting) holding NaN or +-inf; ``[]`` if none.

    Per device and dtype, two fused reductions and one host sync: a NaN makes the L1 norm NaN, an
    infinity makes the max-abs norm infinite (a large but finite tensor can overflow the L1 norm,
    never the max).  Tensors are named one by one only when something is wrong.
    """
    named = [(name, t.detach()) for name, t in floating_tensors(state) if t.numel()]
    groups: Dict[tuple, List[torch.Tensor]] = defaultdict(list)
    for _, t in named:
        groups[(t.device, t.dtype)].append(t)
    flags = []
    for tensors in groups.values():
        l1 = torch.stack(torch._foreach_norm(tensors, 1))
        max_abs = torch.stack(torch._foreach_norm(tensors, math.inf))
        flags.append((l1.isnan() | max_abs.isinf()).any())
    if not any(bool(flag) for flag in flags):
        return []
    return [name for name, t in named if not bool(torch.isfinite(t).all())][:limit]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    # KeyError's str() adds quotes and state-dict errors span many lines
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the renames still happened
        pass
    finally:
        os.close(fd)


def _link_over(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` the same file as ``src`` (a hard link; a copy where links are unsupported)."""
    staging = dst.with_name(dst.name + ".link")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    try:
        os.link(src, staging)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        shutil.copyfile(src, staging)
    os.replace(staging, dst)


def _is_complete_zip(path: Path) -> bool:
    """Cheap structural check (the zip directory at the end of the file): a torn write fails it."""
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _install(new: Path, path: Path, keep_current: bool) -> None:
    """Rename ``new`` over ``path``; the current ``path`` stays as ``*.prev.pt`` (``keep_current``) or ``*.bad.pt``.

    ``path`` exists at every instant: it is hard-linked to its new name first, then replaced.
    """
    if path.exists():
        _link_over(path, previous_checkpoint_path(path) if keep_current else rejected_checkpoint_path(path))
    os.replace(new, path)
    _fsync_dir(path.parent)


class _RecordingWriter:
    """A file wrapper that remembers the OSError of a failed write (``torch.save`` reports it as 'unexpected pos')."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def os_error_reason(err: OSError) -> str:
    """What an OSError means for the user: ``the disk is full (No space left on device)``, ..."""
    plain = err.strerror or first_line(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({plain})"
    if err.errno == errno.EROFS:
        return f"the filesystem is read-only ({plain})"
    return plain


def describe_os_error(err: OSError) -> str:
    """One line naming the file and the reason of an OSError."""
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{where}{os_error_reason(err)}"


def _write_error(path: Path, err: OSError) -> CheckpointWriteError:
    current = f"{path} is intact" if path.exists() else "no earlier checkpoint exists"
    return CheckpointWriteError(f"cannot write checkpoint {path}: {os_error_reason(err)}; the partial file was "
                                f"removed and {current}", err.errno)


def prepare_output_folder(path, flag: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents), or raise :class:`InputError` naming ``flag`` and the reason."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest existing ancestor
    if not existing.is_dir():
        what = "a file is there" if existing == path else f"{existing} is a file"
        raise InputError(f"{flag} {path}: {what}; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = (f"{existing} does not accept new folders" if err.errno == errno.ENOENT
                  else os_error_reason(err))  # e.g. /proc: it exists, yet mkdir says "no such file"
        raise InputError(f"{flag} {path}: cannot create it: {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "the filesystem is read-only" if _read_only(path) else "permission denied"
        raise InputError(f"{flag} {path}: cannot write there: {reason}")
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def save_checkpoint(state: dict, path, keep_previous: bool = True) -> Path:
    """Atomically write ``state`` to ``path``, keeping the former file as ``*.prev.pt`` if ``keep_previous``.

    Refuses (:class:`NonFiniteState`, nothing written) when a floating tensor anywhere in ``state``
    is NaN or infinite.  The new checkpoint goes to ``*.pt.tmp``, is fsynced, then the current file is
    hard-linked to ``*.prev.pt`` and the temporary file renamed over it, so ``path`` exists at every
    instant and a crash leaves at least one complete checkpoint.  A file that is not a complete zip
    never replaces the backup (it goes to ``*.bad.pt``).  When the filesystem refuses the write
    (full, read-only), the partial file is removed and :class:`CheckpointWriteError` says so.
    """
    path = Path(path)
    bad = nonfinite_entries(state)
    if bad:
        raise NonFiniteState(f"{path} not written: non-finite values in {', '.join(bad)}")
    tmp = temporary_checkpoint_path(path)
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a fresh file: a resumed state may still map the old one
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous:
            _install(tmp, path, keep_current=_is_complete_zip(path))
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        oserror = writer.error if writer is not None and writer.error is not None else err
        if isinstance(oserror, OSError):
            raise _write_error(path, oserror) from None
        raise
    return path


def _read_verified(path: Path, map_location):
    """``(state, None)`` for a loadable, finite checkpoint; else ``(None, one-line reason)``."""
    if not path.exists():
        return None, "missing"
    if path.is_dir():
        return None, "a folder, not a checkpoint file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes: the reason below says enough
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = detail[0].split(". ")[0] if detail and "WeightsUnpickler error:" in str(err) else first_line(err)
        return None, f"not a plain-tensor checkpoint, refused by torch.load(weights_only=True) ({reason})"
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt file can fail in many ways
        return None, f"unreadable ({type(err).__name__}: {first_line(err)})"
    if not isinstance(state, dict):
        return None, f"not a checkpoint (holds a {type(state).__name__}, expected a dict)"
    bad = nonfinite_entries(state)
    if bad:
        return None, f"non-finite values in {', '.join(bad)}"
    return state, None


def load_checkpoint(path, map_location="cpu", repair: bool = False) -> dict:
    """Load the newest good checkpoint of ``path`` (``torch.load(weights_only=True)``: it cannot run code).

    Good means loadable and finite.  ``path`` is preferred; a complete, newer ``*.pt.tmp`` (a save
    interrupted between writing and renaming) wins over it; ``*.prev.pt`` is the fallback.  Using
    another file than ``path`` is announced with a warning.  ``repair=True`` (resume) then makes
    ``path`` that file, keeping a rejected ``path`` as ``*.bad.pt``, so that the next save can never
    rotate a bad file over the good backup.  Raises :class:`FileNotFoundError` when there is no
    file at all and :class:`CheckpointError` (one line, every candidate's reason) when none is good.
    """
    path = Path(path)
    prev, tmp = previous_checkpoint_path(path), temporary_checkpoint_path(path)
    if not path.exists() and not prev.exists() and not tmp.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state, reason = _read_verified(path, map_location)
    if tmp.exists():
        newer, _ = _read_verified(tmp, map_location)
        if newer is not None and (state is None or newer.get("iteration", -1) > state.get("iteration", -1)):
            warnings.warn(f"{tmp} is a complete checkpoint (iteration {newer.get('iteration')}) newer than {path} "
                          f"({reason or 'iteration ' + str(state.get('iteration'))}): a save was interrupted; using it")
            if repair:
                _install(tmp, path, keep_current=state is not None)
            return newer
    if state is not None:
        return state
    fallback, prev_reason = _read_verified(prev, map_location) if prev.exists() else (None, "missing")
    if fallback is None:
        raise CheckpointError(f"{path}: {reason}; {prev.name}: {prev_reason}; no good checkpoint to load")
    moved = ""
    if repair:
        if path.exists():
            _link_over(path, rejected_checkpoint_path(path))
            moved = f"; kept the rejected file as {rejected_checkpoint_path(path).name}"
        _link_over(prev, path)
        _fsync_dir(path.parent)
    warnings.warn(f"{path}: {reason}; falling back to {prev} (iteration {fallback.get('iteration')}){moved}")
    return fallback


def last_good_checkpoint(path) -> str:
    """A sentence naming the newest loadable, finite one of ``path`` and ``*.prev.pt``, for error messages."""
    path = Path(path)
    for candidate in (path, previous_checkpoint_path(path)):
        state, _ = _read_verified(candidate, "cpu")
        if state is not None:
            return f"The last good checkpoint is {candidate} (iteration {state.get('iteration')})."
    return f"There is no good checkpoint in {path.parent} yet."


# ---------------------------------------------------------------------------------------------
# Seeding, RNG state, devices
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every global RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; anything else is passed to :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init_distributed(device_name: str = "auto"):
    """Join the process group when launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

    Returns ``(rank, world_size, device)``; a plain ``python`` launch gives ``(0, 1, device)``.
    Each process drives the GPU ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """Leave the process group together at the end of a run (no-op when alone).

    Every rank first waits for the others (rank 0 may still be writing a checkpoint), so no rank
    exits while a peer's gloo connection to it is still open: a rank torn down mid-connection can abort.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` in place across processes with one flat all-reduce (no-op when alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(list(tensors))
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, list(tensors))):
        tensor.copy_(synced)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of ``params`` across processes (the manual DDP reduction).

    DDP's reducer does not follow ``autograd.grad(create_graph=True)`` (the R1 double backward),
    so the loop reduces gradients itself after each backward.
    """
    grads = []
    for p in params:
        if p.grad is None:  # every rank must send the same layout
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_mean_(grads)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every process (no-op when alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp auto`` -> ``bf16`` on a GPU that supports it, else ``none``; other values unchanged.

    CPUs get fp32: oneDNN's bf16 3-D convolution (torch 2.14.1) returns non-finite weight gradients for some
    shapes on some CPUs, among them the 64-px discriminator's at batch 2-8 on an Intel Xeon with AMX.
    """
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return amp


def write_json(path, data: dict) -> None:
    """Write ``data`` as pretty JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def append_jsonl(path, record: dict) -> None:
    """Append one JSON record as a line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class TensorBoardLog:
    """TensorBoard event files in ``folder``: scalars, and sample grids as animated GIF images.

    A GIF is stored as an image summary holding the file's bytes, which TensorBoard's image
    dashboard shows animated (torch's ``add_video`` would need moviepy's pre-2.0 API for the same).
    """

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, iteration: int, values: Dict[str, float]) -> None:
        """``values``: TensorBoard tag -> number, e.g. ``{"loss/G": 0.7}``."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def gif(self, tag: str, path, iteration: int) -> None:
        """The GIF file ``path`` as image ``tag`` at ``iteration``."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        data = Path(path).read_bytes()
        width, height = struct.unpack("<HH", data[6:10])  # the GIF header's logical screen size
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=data)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which torch's SummaryWriter needs) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
