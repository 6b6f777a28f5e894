"""Losses, the R1 penalty, video grids (GIF/MP4), checkpoints, seeding and device helpers."""

import json
import os
from fractions import Fraction
import random
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

    The file is written to a temporary name and renamed, so readers never see half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        import imageio.v3 as iio

        # Pillow writes some grayscale GIFs that it cannot read back: always hand it RGB.
        data = np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames
        iio.imwrite(tmp, data, extension=".gif", duration=1000.0 / fps, loop=0)
    elif suffix == ".mp4":
        encode_video(tmp, frames, fps, container_format="mp4")  # the temporary name hides the extension
    elif suffix == ".png":
        import imageio.v3 as iio

        strip = np.concatenate(list(frames), axis=1)  # frames side by side
        iio.imwrite(tmp, strip[..., 0] if strip.shape[-1] == 1 else strip, extension=".png")
    else:
        raise ValueError(f"{path}: unsupported video format {suffix!r}; expected .gif, .mp4 or .png")
    os.replace(tmp, path)
    return path


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


def previous_checkpoint_path(path) -> Path:
    """``run/checkpoint.pt`` -> ``run/checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(state: dict, path, keep_previous: bool = True) -> Path:
    """Atomically write ``state`` to ``path``, keeping the former file as ``*.prev.pt`` if ``keep_previous``.

    The new checkpoint is written to a temporary file, flushed to disk, then renamed over the old
    one; a crash at any moment leaves at least one complete checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous_checkpoint_path(path))
    os.replace(tmp, path)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a checkpoint cannot run code).

    If ``path`` is missing, truncated or corrupt and ``*.prev.pt`` exists, warn and load that.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file falls back the same way
        prev = previous_checkpoint_path(path)
        if not prev.exists():
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such checkpoint") from None
            raise RuntimeError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
        warnings.warn(f"{path} is unreadable ({type(err).__name__}); falling back to {prev}")
        return torch.load(prev, map_location=map_location, weights_only=True)


def generator_from_checkpoint(path, device="cpu"):
    """Rebuild the generator stored in a training checkpoint, in eval mode.

    Returns ``(generator, checkpoint_dict)``.
    """
    from models import Generator, ModelConfig, load_weights

    ckpt = load_checkpoint(path, map_location=device)
    if "generator" not in ckpt or "config" not in ckpt:
        raise KeyError(f"{path}: not a TGANv2 training checkpoint (no 'generator'/'config' entry)")
    gen = Generator(ModelConfig(**ckpt["config"]["model"])).to(device)
    load_weights(gen, ckpt["generator"], "generator")
    return gen.eval(), ckpt


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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
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


def average_gradients(module: torch.nn.Module) -> None:
    """Average the ``.grad`` of every parameter across processes (the manual DDP reduction).

    DDP's reducer does not follow ``autograd.grad(create_graph=True)`` (the R1 double backward),
    so the loop reduces gradients itself after each backward.
    """
    grads = []
    for p in module.parameters():
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


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device``: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp auto`` -> ``bf16`` where :func:`bf16_supported`, else ``none``; other values unchanged."""
    if amp == "auto":
        return "bf16" if bf16_supported(device) else "none"
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
