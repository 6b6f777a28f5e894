"""TGANv2 networks: ConvLSTM, the multi-level sparse generator and the 3-D ResNet discriminators; the
real-data pyramid the discriminators compare against; loading a trained generator and sampling it.

Tensor layout conventions used throughout the repository:

* videos are ``(N, C, T, H, W)`` with values in ``[-1, 1]``;
* inside the generator, time is folded into the batch: ``(N * T, C, H, W)`` with the
  frames of one video contiguous (sample-major), so ``x.view(N, T, C, H, W)`` recovers them.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, asdict, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import InputError, first_line, load_checkpoint

# ---------------------------------------------------------------------------------------------
# Presets (docs/METHOD.md, 'Presets')
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Everything needed to rebuild a generator and a discriminator (saved in checkpoints)."""

    z_dim: int = 256
    t_size: int = 4
    clstm_ch: int = 256
    clstm_layers: int = 1
    base_channels: List[int] = field(default_factory=lambda: [128])
    level_channels: List[int] = field(default_factory=lambda: [64, 32, 32])
    out_channels: int = 1
    dis_channels: List[int] = field(default_factory=lambda: [32, 32, 64, 128, 256])
    n_frames: int = 16
    subsample_frames: List[int] = field(default_factory=lambda: [2, 2, 2])
    subsample_batch: List[int] = field(default_factory=lambda: [1, 1, 1])
    n_classes: int = 0  # > 0: class-conditional (categorical BN in G, projection in every D)
    content_skip: bool = False  # add the fc output to every ConvLSTM output (the authors: no)
    motion_warp: bool = False  # render one map per clip, moved by per-frame flows from the ConvLSTM (the authors: no)
    rigid_cells: int = 0  # motion warp, dense generation only: move frame 0 rigidly per cell of a grid this wide (0: no)
    still_first_frame: bool = False  # rigid cells only: frame 0 is the unmoved map (the still frame), not its flow's
    wall_bounce: bool = False  # rigid cells only: displacements folded back at the frame's walls, as real digits bounce

    @property
    def n_levels(self) -> int:
        return len(self.level_channels) + 1

    @property
    def resolutions(self) -> List[int]:
        """Frame size of every level, e.g. ``[8, 16, 32, 64]`` for Moving MNIST."""
        first = self.t_size * 2 ** len(self.base_channels)
        return [first * 2 ** level for level in range(self.n_levels)]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The paper's 192x192 UCF-101 model.
    "paper": dict(
        t_size=3,
        clstm_ch=1024,
        base_channels=[512, 256, 128],
        level_channels=[64, 32, 32],
        out_channels=3,
        dis_channels=[64, 128, 256, 512, 1024],
    ),
    # 64x64 one-channel videos, as in the earlier tganv2-pytorch port.
    "movingmnist": dict(
        t_size=4,
        clstm_ch=256,
        base_channels=[128],
        level_channels=[64, 32, 32],
        out_channels=1,
        dis_channels=[32, 32, 64, 128, 256],
    ),
}


def model_config(preset: str, resolution: Optional[int] = None, **overrides) -> ModelConfig:
    """Build the :class:`ModelConfig` of a named preset (a key of ``PRESETS``).

    ``resolution`` rescales the preset to another final frame size by changing only the ConvLSTM's
    spatial size (e.g. the paper preset at 64, 128 or 192 px uses ``t_size`` 1, 2 or 3).
    ``overrides`` set any other :class:`ModelConfig` field; ``None`` values are ignored.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if resolution is not None:
        n_up = len(values["base_channels"]) + len(values["level_channels"])
        if resolution % 2**n_up:
            raise ValueError(f"resolution {resolution} is not a multiple of {2**n_up} (preset {preset!r})")
        values["t_size"] = resolution // 2**n_up
    cfg = ModelConfig(**values)
    n_sub = cfg.n_levels - 1
    if len(cfg.subsample_frames) != n_sub or len(cfg.subsample_batch) != n_sub:
        raise ValueError(
            f"--subsample-frames and --subsample-batch need {n_sub} values (one per level "
            f"transition), got {cfg.subsample_frames} and {cfg.subsample_batch}"
        )
    if any(s < 1 for s in cfg.subsample_frames + cfg.subsample_batch):
        raise ValueError("subsampling strides must be >= 1")
    if cfg.rigid_cells < 0 or (cfg.rigid_cells and not cfg.motion_warp):
        raise ValueError(f"--rigid-cells must be 0, or a positive grid width with --motion-warp; got {cfg.rigid_cells}")
    check_rigid_cell_settings(cfg)
    return cfg


# The ModelConfig settings that shape what rigid cells carry, each needing rigid_cells above 0, and why (for errors).
RIGID_CELL_SETTINGS = {"still_first_frame": "the still first frame is what rigid cells carry",
                       "wall_bounce": "the wall bounce folds what rigid cells carry"}


def check_rigid_cell_settings(cfg: ModelConfig) -> None:
    """Each of :data:`RIGID_CELL_SETTINGS` that ``cfg`` turns on needs ``cfg.rigid_cells`` above 0."""
    for name in RIGID_CELL_SETTINGS:
        if getattr(cfg, name) and not cfg.rigid_cells:
            raise ValueError(f"--{name.replace('_', '-')} needs rigid cells (--rigid-cells N > 0)")


# The generator's BatchNorm epsilon: Chainer's default, which the authors' code uses.
BN_EPS = 2e-5


def init_conv(module: nn.Module, gain: float) -> None:
    """Glorot-uniform weights with ``gain`` and zero bias (the authors' ResNet blocks and D's linear)."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def init_lecun(module: nn.Module) -> None:
    """LeCun-normal weights (std ``1/sqrt(fan_in)``) and zero bias: Chainer's default, which the
    authors' fc, ConvLSTM and render convolutions use (4x the Glorot scale for the fc layer)."""
    fan_in = module.weight[0].numel()
    nn.init.normal_(module.weight, std=fan_in**-0.5)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes of the default group.

    Each process contributes ``(count, mean, variance)`` of its batch through one differentiable
    all-reduce, combined with the parallel-variance formula (stable, unlike ``E[x^2] - E[x]^2``).
    It works with gloo on CPU as well as NCCL (``torch.nn.SyncBatchNorm`` is GPU-only), and
    gradients flow through the global statistics.  Without a process group it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device)
        # An all-gather written as an all-reduce into this rank's row, so autograd can follow it.
        rows = torch.zeros(dist.get_world_size(), 2 * mean.numel() + 1, device=x.device)
        rows = rows.index_copy(0, torch.tensor([dist.get_rank()], device=x.device),
                               torch.cat([count, mean, var])[None])
        rows = _AllReduceSum.apply(rows)
        counts, means, variances = rows[:, :1], rows[:, 1 : 1 + mean.numel()], rows[:, 1 + mean.numel() :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean).pow(2))).sum(0) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), self.momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = self.weight * scale
        shift = -mean * scale + (self.bias if self.affine else 0)
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``module`` for :class:`SyncBatchNorm2d`, keeping its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, affine=child.affine)
            sync = sync.to(child.running_mean.device)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


class ConvLSTM(nn.Module):
    """Stacked 2-D ConvLSTM whose first layer sees an input only at step 0.

    ``forward(x0, n_steps)`` with ``x0`` of shape ``(N, C, h, w)`` returns the last layer's
    hidden states ``(N, n_steps, C, h, w)``.  Gates are split in the order i, f, o, g.
    """

    def __init__(self, channels: int, n_layers: int = 1):
        super().__init__()
        self.channels = channels
        self.input_convs = nn.ModuleList(
            nn.Conv2d(channels, 4 * channels, 3, padding=1, bias=True) for _ in range(n_layers)
        )
        self.state_convs = nn.ModuleList(
            nn.Conv2d(channels, 4 * channels, 3, padding=1, bias=False) for _ in range(n_layers)
        )
        for conv in list(self.input_convs) + list(self.state_convs):
            init_lecun(conv)

    @staticmethod
    def _cell(gates: torch.Tensor, c: Optional[torch.Tensor]):
        i, f, o, g = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(i) * torch.tanh(g)
        if c is not None:  # c is None means the zero initial cell state
            c_new = c_new + torch.sigmoid(f) * c
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new, c_new

    def forward(self, x0: torch.Tensor, n_steps: int) -> torch.Tensor:
        n_layers = len(self.input_convs)
        hs: List[Optional[torch.Tensor]] = [None] * n_layers
        cs: List[Optional[torch.Tensor]] = [None] * n_layers
        outputs = []
        for step in range(n_steps):
            layer_input = x0 if step == 0 else None
            for layer in range(n_layers):
                in_conv, state_conv = self.input_convs[layer], self.state_convs[layer]
                if layer_input is not None:
                    gates = in_conv(layer_input)
                else:
                    # A zero input through a conv is just its bias: skip the convolution.
                    gates = in_conv.bias.view(1, -1, 1, 1)
                if hs[layer] is not None:  # the zero initial state contributes nothing
                    gates = gates + state_conv(hs[layer])
                hs[layer], cs[layer] = self._cell(gates, cs[layer])
                layer_input = hs[layer]
            outputs.append(hs[-1])
        return torch.stack(outputs, dim=1)


class CategoricalBatchNorm2d(nn.Module):
    """BatchNorm2d with a per-class scale and shift (initialised to 1 and 0).

    ``forward(x, labels)``: ``x`` ``(B, C, H, W)``, ``labels`` ``(B,)`` class indices.  The
    normalisation itself is an affine-free ``nn.BatchNorm2d`` (``norm``), so ``--sync-bn`` applies.
    """

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS, affine=False)
        self.scale = nn.Embedding(n_classes, channels)
        self.shift = nn.Embedding(n_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale(labels)[:, :, None, None] + self.shift(labels)[:, :, None, None]


def make_norm(channels: int, n_classes: int) -> nn.Module:
    """The generator's BatchNorm: plain, or categorical when ``n_classes > 0``."""
    return CategoricalBatchNorm2d(channels, n_classes) if n_classes else nn.BatchNorm2d(channels, eps=BN_EPS)


def normalize(norm: nn.Module, x: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Apply a :func:`make_norm` layer; ``labels`` (one per row of ``x``) only matter when conditional."""
    return norm(x, labels) if isinstance(norm, CategoricalBatchNorm2d) else norm(x)


class UpBlock(nn.Module):
    """2-D ResNet up-block applied per frame: ``(B, in, H, W) -> (B, out, 2H, 2W)``."""

    def __init__(self, in_ch: int, out_ch: int, n_classes: int = 0):
        super().__init__()
        self.bn1 = make_norm(in_ch, n_classes)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn2 = make_norm(out_ch, n_classes)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)
        init_conv(self.conv1, math.sqrt(2))
        init_conv(self.conv2, math.sqrt(2))
        init_conv(self.shortcut, 1.0)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.interpolate(F.relu(normalize(self.bn1, x, labels)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(normalize(self.bn2, self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class RenderHead(nn.Module):
    """``BN -> ReLU -> conv3x3 -> tanh``: features ``(B, C, H, W)`` to images ``(B, out, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, n_classes: int = 0):
        super().__init__()
        self.bn = make_norm(in_ch, n_classes)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        init_lecun(self.conv)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.tanh(self.conv(F.relu(normalize(self.bn, x, labels))))


def warp(content: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Move one feature map per clip to every frame by backward warping.

    ``content`` ``(N, C, H, W)``; ``flow`` ``(N, T, 2, h, w)``: per-frame x and y displacements in
    ``grid_sample``'s normalised units (2 = the frame's width), bilinearly resized to ``(H, W)``.
    Frame ``t`` at pixel ``p`` reads ``content`` at ``p + flow_t(p)``, bilinearly, and the border
    value beyond the edge.  Returns ``(N * T, C, H, W)``.
    """
    n, t = flow.shape[:2]
    height, width = content.shape[-2:]
    flow = flow.reshape(n * t, 2, *flow.shape[-2:])
    if flow.shape[-2:] != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    # Pixel centres in normalised coordinates (align_corners=False): the identity grid.
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=flow.device, dtype=flow.dtype)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=flow.device, dtype=flow.dtype)
    grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack((grid_x, grid_y), -1) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(content.repeat_interleave(t, 0), grid.to(content.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


# Every pixel's weight in a cell's displacement is its ink plus this much, so a cell without ink takes its plain mean.
INK_FLOOR = 0.01


def cell_displacements(flow: torch.Tensor, frames: torch.Tensor, cells: int) -> torch.Tensor:
    """How far each cell of each frame has moved since frame 0, for :meth:`Generator.generate` with ``rigid_cells``.

    ``flow`` ``(N, T, 2, h, w)`` (see :func:`warp`); ``frames`` ``(N, C, T, H, W)`` in ``[-1, 1]``, the frames
    that flow draws.  Per frame, the change of the flow since frame 0 is averaged over each of ``cells x cells``
    equal cells, each pixel weighted by the ink (``(frames + 1) / 2``, mean over channels) of that frame at it plus
    ``INK_FLOOR``: the glyph's own motion, not the background's.  Returns ``(N, T, 2, cells, cells)`` in
    :func:`warp`'s units, zero at frame 0.
    """
    n, t = flow.shape[:2]
    change = (flow - flow[:, :1]).float().flatten(0, 1)  # (N * T, 2, h, w)
    ink = fold_time((frames.float().mean(1, keepdim=True) + 1) / 2)  # (N * T, 1, H, W)
    weight = F.adaptive_avg_pool2d(ink, flow.shape[-2:]) + INK_FLOOR
    moved = F.adaptive_avg_pool2d(change * weight, cells) / F.adaptive_avg_pool2d(weight, cells)
    return moved.view(n, t, 2, cells, cells).to(flow.dtype)


# A pixel of frame 0 brighter than this (0 black, 1 white) is ink when bounding a clip's glyphs for the wall bounce.
WALL_INK = 0.3


def bounce_off_walls(displacements: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """Fold rigid-cell displacements back at the frame's walls, so a carried clip's glyphs bounce off them as real
    moving digits do instead of leaving the frame.

    ``displacements`` ``(N, T, 2, cells, cells)`` from :func:`cell_displacements` (:func:`warp`'s units, x then y: the
    map moves by ``-d * size / 2`` pixels); ``first_frame`` ``(N, C, H, W)`` in ``[-1, 1]``, the frame they carry.
    Per clip and axis, the shifts that keep its ink (pixels above :data:`WALL_INK`) inside the frame form a range; a
    shift past either end is reflected back into it, like a ball in a box.  Every cell of a clip shares that range, so
    the cells' bilinear blend stays inside it too.  An axis whose ink spans the frame keeps its shifts.  Returns
    ``displacements``' shape and dtype.
    """
    n = displacements.shape[0]
    ink = (first_frame.float().mean(1) + 1) / 2 > WALL_INK  # (N, H, W)
    folded = displacements.float().clone()
    for axis, present in enumerate((ink.any(1), ink.any(2))):  # (N, W): columns holding ink, then (N, H): rows
        size = present.shape[1]
        index = torch.arange(size, device=ink.device)
        first = torch.where(present, index, size).amin(1)  # a clip without ink: its range is two frames wide
        last = torch.where(present, index, -1).amax(1)
        low = (-first).float().view(n, 1, 1, 1)  # the shift (px) that brings the ink to the left (top) wall
        span = (size - 1 - last + first).float().view(n, 1, 1, 1)  # from there to the right (bottom) wall
        shift = -folded[:, :, axis] * size / 2
        phase = torch.remainder(shift - low, 2 * span.clamp(min=1))
        bounced = low + torch.where(phase > span, 2 * span - phase, phase)
        folded[:, :, axis] = torch.where(span > 0, -bounced * 2 / size, folded[:, :, axis])
    return folded.to(displacements.dtype)


def subsample(x: torch.Tensor, subsample_frames: int, subsample_batch: int, time_dim: int,
              offset: Optional[int] = None, offset_per_sample: bool = False) -> torch.Tensor:
    """Keep every ``subsample_frames``-th frame from a random offset and every ``subsample_batch``-th sample.

    The two strides are one level transition's entries of ``--subsample-frames`` and
    ``--subsample-batch`` (``ModelConfig.subsample_frames``, ``.subsample_batch``).  ``x`` has the
    batch on dim 0 and time on ``time_dim``.  Exactly ``T // subsample_frames`` frames are kept
    whatever the offset, so shapes never depend on the random draw.  The offset is drawn from
    ``[0, subsample_frames)`` with the global generator of ``x``'s device unless given: one for the
    whole batch (the generator's layers), or one per sample with ``offset_per_sample`` (real clips,
    as the authors' data pipeline does).
    """
    kept = x.shape[time_dim] // subsample_frames
    if kept < 1:
        raise ValueError(f"cannot subsample {x.shape[time_dim]} frames with stride {subsample_frames}")
    x = x[::subsample_batch]
    if subsample_frames == 1:
        return x
    if offset is None:
        # A device tensor, not a Python int: no host sync, and one compiled graph for every offset.
        offset = torch.randint(subsample_frames, (x.shape[0] if offset_per_sample else 1,), device=x.device)
    frames = (torch.as_tensor(offset, device=x.device).view(-1, 1)
              + subsample_frames * torch.arange(kept, device=x.device))
    if frames.shape[0] == 1:
        return x.index_select(time_dim, frames[0])
    index_shape = [1] * x.dim()
    index_shape[0], index_shape[time_dim] = frames.shape
    return torch.take_along_dim(x, frames.view(index_shape), dim=time_dim)


def real_pyramid(x: torch.Tensor, subsample_frames: Sequence[int], subsample_batch: Sequence[int],
                 labels: Optional[torch.Tensor] = None):
    """The real counterpart of the generator's renders (docs/METHOD.md, 'Real-data pyramid').

    ``x``: full-resolution clips ``(N, C, T, H, W)``.  Level ``l`` (1-based, ``L`` levels) is the
    clip after ``l - 1`` rounds of :func:`subsample` (a random frame offset per clip), average-pooled
    spatially by ``2 ** (L - l)``.  Returns ``[x1, ..., xL]`` (and the labels of every level, subsampled
    with the same batch strides, when ``labels`` is given).
    """
    n_levels = len(subsample_frames) + 1
    levels = []
    for level in range(n_levels):
        if level > 0:
            x = subsample(x, subsample_frames[level - 1], subsample_batch[level - 1], time_dim=2,
                          offset_per_sample=True)
        factor = 2 ** (n_levels - 1 - level)
        levels.append(F.avg_pool3d(x, (1, factor, factor)) if factor > 1 else x.contiguous())
    return (levels, level_labels(labels, subsample_batch)) if labels is not None else levels


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, T, H, W)`` videos to ``(N * T, C, H, W)`` frames, each video's in order (the inverse of
    :func:`unfold_time`)."""
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


def unfold_time(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(N * T, C, H, W)`` frames to ``(N, C, T, H, W)`` videos."""
    return x.view(n, -1, *x.shape[1:]).transpose(1, 2)


def level_labels(labels: Optional[torch.Tensor], subsample_batch: Sequence[int]) -> list:
    """Class labels ``(N,)`` of every level after the cumulative batch strides (``None`` stays ``None``)."""
    out = [labels]
    for stride in subsample_batch:
        out.append(None if out[-1] is None else out[-1][::stride])
    return out


def frame_labels(labels: Optional[torch.Tensor], n_frames: int) -> Optional[torch.Tensor]:
    """Per-video labels ``(N,)`` to per-frame labels ``(N * n_frames,)`` (time folded into the batch)."""
    return None if labels is None else labels.repeat_interleave(n_frames)


# A motion-warp generator's modules that draw each clip's glyphs (see Generator.glyph_state_keys).
GLYPH_MODULES = ("fc", "content_blocks", "level_blocks", "renders")


class Generator(nn.Module):
    """Multi-level TGANv2 generator.

    ``forward(z)`` trains sparsely: between levels it keeps every ``subsample_frames[l]``-th frame
    (random offset) and every ``subsample_batch[l]``-th sample, and returns one render per level, level ``l`` shaped
    ``(N_l, C, T_l, H_l, W_l)``.  ``generate(z, n_frames, level)`` renders densely.  A conditional
    generator (``cfg.n_classes > 0``) also takes ``labels`` ``(N,)``, which steer every BatchNorm.

    With ``cfg.motion_warp`` the level blocks run once per clip, on a content map made from z's
    projection, and every frame is that map warped by a flow field read from the ConvLSTM's features
    (:func:`warp`), so a glyph moves instead of being redrawn at every frame.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, k = cfg.clstm_ch, cfg.n_classes
        self.fc = nn.Linear(cfg.z_dim, ch * cfg.t_size * cfg.t_size)
        init_lecun(self.fc)
        self.clstm = ConvLSTM(ch, cfg.clstm_layers)
        self.base = nn.ModuleList()
        for out_ch in cfg.base_channels:
            self.base.append(UpBlock(ch, out_ch, k))
            ch = out_ch
        self.renders = nn.ModuleList([RenderHead(ch, cfg.out_channels, k)])
        self.level_blocks = nn.ModuleList()
        for out_ch in cfg.level_channels:
            self.level_blocks.append(UpBlock(ch, out_ch, k))
            self.renders.append(RenderHead(out_ch, cfg.out_channels, k))
            ch = out_ch
        if cfg.motion_warp:
            self.flow_head = nn.Conv2d(cfg.base_channels[-1], 2, 3, padding=1)
            nn.init.zeros_(self.flow_head.weight)  # zero flow: every frame starts as the content map
            nn.init.zeros_(self.flow_head.bias)
            self.content_blocks = nn.ModuleList()
            ch = cfg.clstm_ch
            for out_ch in cfg.base_channels:
                self.content_blocks.append(UpBlock(ch, out_ch, k))
                ch = out_ch

    @property
    def n_levels(self) -> int:
        return len(self.renders)

    def sample_z(self, n: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Latents ``(n, z_dim)`` drawn from ``U(-1, 1)``."""
        device = device if device is not None else self.fc.weight.device
        return torch.rand(n, self.cfg.z_dim, device=device, generator=generator) * 2 - 1

    def sample_labels(self, n: int, device=None, generator: Optional[torch.Generator] = None):
        """Uniformly drawn classes ``(n,)`` for a conditional generator, ``None`` otherwise."""
        if not self.cfg.n_classes:
            return None
        device = device if device is not None else self.fc.weight.device
        return torch.randint(self.cfg.n_classes, (n,), device=device, generator=generator)

    def _check_labels(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        if bool(self.cfg.n_classes) != (labels is not None):
            kind = f"conditional ({self.cfg.n_classes} classes)" if self.cfg.n_classes else "unconditional"
            raise ValueError(f"this generator is {kind}: labels must {'' if self.cfg.n_classes else 'not '}be given")
        if labels is not None and labels.shape != (z.shape[0],):
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(labels.shape)}")

    def recurrent_states(self, z: torch.Tensor, n_frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """z's projection ``(N, C, t, t)`` and the ConvLSTM's outputs ``(N, n_frames, C, t, t)`` (no content skip)."""
        x0 = self.fc(z).view(z.shape[0], self.cfg.clstm_ch, self.cfg.t_size, self.cfg.t_size)
        return x0, self.clstm(x0, n_frames)

    def frames(self, z: torch.Tensor, n_frames: int, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Level-1 features of every frame: ``(N * n_frames, C_base, r1, r1)``."""
        return self._frames(z, n_frames, labels)[1]

    def _frames(self, z: torch.Tensor, n_frames: int, labels: Optional[torch.Tensor]):
        """z's projection ``(N, C, t, t)`` and the level-1 features of every frame (see :meth:`frames`)."""
        n = z.shape[0]
        x0, h = self.recurrent_states(z, n_frames)
        if self.cfg.content_skip:  # z's projection reaches every frame, not only the LSTM's first step
            h = h + x0[:, None]
        h = h.reshape(n * n_frames, *h.shape[2:])
        per_frame = frame_labels(labels, n_frames)
        for block in self.base:
            h = block(h, per_frame)
        return x0, h

    def content_and_flow(self, z: torch.Tensor, n_frames: int, labels: Optional[torch.Tensor] = None):
        """For ``cfg.motion_warp``: the level-1 content map ``(N, C_base, r1, r1)`` and the flow
        fields ``(N, n_frames, 2, r1, r1)`` that move it to each frame (see :func:`warp`)."""
        x0, h = self._frames(z, n_frames, labels)
        flow = self.flow_head(h).view(z.shape[0], n_frames, 2, *h.shape[-2:])
        content = x0
        for block in self.content_blocks:
            content = block(content, labels)
        return content, flow

    def still_frame(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """For ``cfg.motion_warp``: the content map of each clip rendered at the last level with no motion,
        ``(N, C, H, W)`` (what every frame is while the flow is zero).  The frame warm-up of the default
        recipe trains it against a :class:`FrameDiscriminator`."""
        return self.renders[-1](self.still_maps(z, labels)[-1], labels)

    def still_maps(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """For ``cfg.motion_warp``: each clip's content map at every level, unmoved: level ``l`` (0-based)
        is ``(N, C_l, r_l, r_l)``, what ``renders[l]`` draws every frame of that level from while the flow
        is zero."""
        if not self.cfg.motion_warp:
            raise ValueError("still frames need a motion-warp generator (cfg.motion_warp)")
        content = self.fc(z).view(z.shape[0], self.cfg.clstm_ch, self.cfg.t_size, self.cfg.t_size)
        for block in self.content_blocks:
            content = block(content, labels)
        maps = [content]
        for block in self.level_blocks:
            maps.append(block(maps[-1], labels))
        return maps

    def glyph_state_keys(self) -> List[str]:
        """For ``cfg.motion_warp``: the floating-point ``state_dict`` keys (weights and BatchNorm statistics) of
        what draws the glyphs: z's projection, the content and level blocks and every render head.  The rest
        (ConvLSTM, flow head) moves them."""
        if not self.cfg.motion_warp:
            raise ValueError("the glyph path exists only in a motion-warp generator (cfg.motion_warp)")
        return [key for key, value in self.state_dict().items()
                if key.split(".")[0] in GLYPH_MODULES and value.is_floating_point()]

    def still_frame_parameters(self) -> List[nn.Parameter]:
        """The parameters :meth:`still_frame` uses (z's projection, content and level blocks, last render head)."""
        modules = (self.fc, self.content_blocks, self.level_blocks, self.renders[-1])
        return [p for module in modules for p in module.parameters()]

    def _render_warped(self, level: int, content: torch.Tensor, flow: torch.Tensor,
                       labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Level ``level`` (0-based) of every frame of ``flow`` from its content map: ``(N, C, T, H, W)``."""
        per_frame = frame_labels(labels, flow.shape[1])
        return unfold_time(self.renders[level](warp(content, flow), per_frame), content.shape[0])

    def forward(
        self,
        z: torch.Tensor,
        n_frames: Optional[int] = None,
        subsample_frames: Optional[Sequence[int]] = None,
        subsample_batch: Optional[Sequence[int]] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """Render all levels, subsampling between them (sparse training).

        Pass strides of 1 (see :meth:`naive`) to render every level densely.  Returns
        ``[x1, ..., xL]`` with ``x_l`` of shape ``(N_l, C, T_l, H_l, W_l)``; the labels of level
        ``l`` are ``level_labels(labels, subsample_batch)[l - 1]``.
        """
        self._check_labels(z, labels)
        n_frames = n_frames or self.cfg.n_frames
        subsample_frames = self.cfg.subsample_frames if subsample_frames is None else subsample_frames
        subsample_batch = self.cfg.subsample_batch if subsample_batch is None else subsample_batch
        per_level = level_labels(labels, subsample_batch)
        if self.cfg.motion_warp:
            content, flow = self.content_and_flow(z, n_frames, labels)
            renders = [self._render_warped(0, content, flow, labels)]
            for level, block in enumerate(self.level_blocks, start=1):
                flow = subsample(flow, subsample_frames[level - 1], subsample_batch[level - 1], time_dim=1)
                content = block(content[:: subsample_batch[level - 1]], per_level[level])
                renders.append(self._render_warped(level, content, flow, per_level[level]))
            return renders
        n, t = z.shape[0], n_frames
        h = self.frames(z, n_frames, labels)
        renders = [unfold_time(self.renders[0](h, frame_labels(labels, t)), n)]
        for level, (block, head) in enumerate(zip(self.level_blocks, self.renders[1:]), start=1):
            h = subsample(h.view(n, t, *h.shape[1:]), subsample_frames[level - 1], subsample_batch[level - 1],
                          time_dim=1)
            n, t = h.shape[0], h.shape[1]
            per_frame = frame_labels(per_level[level], t)
            h = block(h.reshape(n * t, *h.shape[2:]), per_frame)
            renders.append(unfold_time(head(h, per_frame), n))
        return renders

    def naive(self, z: torch.Tensor, n_frames: Optional[int] = None,
              labels: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """All levels rendered at every frame and sample (the dense-training baseline)."""
        ones = [1] * (self.n_levels - 1)
        return self.forward(z, n_frames, ones, ones, labels=labels)

    def generate(self, z: torch.Tensor, n_frames: Optional[int] = None, level: Optional[int] = None,
                 labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense generation: every frame of every sample rendered at ``level`` (1-based, default last).

        Any ``n_frames`` works (the ConvLSTM unrolls as long as asked).  Call in eval mode to use the
        BatchNorm running statistics, as the authors do.  With ``cfg.rigid_cells`` (motion warp only), frame 0
        is drawn by its flow as usual (or, with ``cfg.still_first_frame``, is the still frame: the map unmoved)
        and every later frame is frame 0's map carried by one displacement per cell of a ``rigid_cells x
        rigid_cells`` grid (:func:`cell_displacements`, bilinearly blended between cells), instead of each
        frame's own flow; with ``cfg.wall_bounce`` those displacements bounce off the frame's walls
        (:func:`bounce_off_walls`).  Returns ``(N, C, n_frames, H, W)``.
        """
        self._check_labels(z, labels)
        n_frames = n_frames or self.cfg.n_frames
        level = self.n_levels if level is None else level
        if not 1 <= level <= self.n_levels:
            raise ValueError(f"level must be in 1..{self.n_levels}, got {level}")
        if self.cfg.motion_warp:
            content, flow = self.content_and_flow(z, n_frames, labels)
            for block in self.level_blocks[: level - 1]:
                content = block(content, labels)
            frames = self._render_warped(level - 1, content, flow, labels)
            if not self.cfg.rigid_cells:
                return frames
            # Frame 0 (as its flow draws it, or the still frame), carried by each cell's displacement: glyphs keep form.
            first = content if self.cfg.still_first_frame else warp(content, flow[:, :1])
            displacements = cell_displacements(flow, frames, self.cfg.rigid_cells)
            if self.cfg.wall_bounce:
                displacements = bounce_off_walls(displacements, self.renders[level - 1](first, labels))
            return self._render_warped(level - 1, first, displacements, labels)
        per_frame = frame_labels(labels, n_frames)
        h = self.frames(z, n_frames, labels)
        for block in self.level_blocks[: level - 1]:
            h = block(h, per_frame)
        return unfold_time(self.renders[level - 1](h, per_frame), z.shape[0])


# ---------------------------------------------------------------------------------------------
# Sampling a generator: from a checkpoint or snapshot, latents and classes from a seeded RNG
# ---------------------------------------------------------------------------------------------


def averaged_generator_state(state: dict) -> dict:
    """G's saved weights (``state["generator"]``) with the glyph-path average put in place, where ``state`` holds one
    (``generator_average``, written by ``--glyph-average``)."""
    return {**state["generator"], **state.get("generator_average", {})}


def load_generator(path, device="cpu", rigid_cells: Optional[int] = None, raw_weights: bool = False,
                   still_first_frame: Optional[bool] = None,
                   wall_bounce: Optional[bool] = None) -> Tuple[Generator, dict]:
    """Rebuild the generator of a training checkpoint or of a G-only snapshot, in eval mode.

    Both hold ``generator`` and ``config``, and ``generator_average`` when the run kept an average of the
    glyph path (``--glyph-average``): those weights replace G's own unless ``raw_weights``.
    ``rigid_cells``, ``still_first_frame`` and ``wall_bounce`` replace the saved ``ModelConfig`` values (``None``:
    keep them; runs from before a setting have 0 and False; rigid cells of 0 also turn the other two off).  Returns
    ``(generator, checkpoint)``; a missing, unreadable or foreign file, or rigid cells for a generator without the
    motion warp, or a still first frame or wall bounce without rigid cells, raises a one-line
    :class:`utils.InputError` naming ``path``.
    """
    try:
        ckpt = load_checkpoint(path, map_location=device)
        if "generator" not in ckpt or "config" not in ckpt:
            raise KeyError("not a TGANv2 checkpoint or snapshot (no 'generator'/'config' entry)")
        cfg = ModelConfig(**ckpt["config"]["model"])
        if rigid_cells is not None:
            if rigid_cells and not cfg.motion_warp:
                raise ValueError(f"--rigid-cells {rigid_cells} needs a motion-warp generator; this one has none")
            cfg.rigid_cells = rigid_cells
            for name in RIGID_CELL_SETTINGS:  # no cells, nothing for them to shape
                setattr(cfg, name, getattr(cfg, name) and bool(rigid_cells))
        for name, value in zip(RIGID_CELL_SETTINGS, (still_first_frame, wall_bounce)):
            if value is not None:
                setattr(cfg, name, value)
        check_rigid_cell_settings(cfg)
        gen = Generator(cfg).to(device)
        load_weights(gen, ckpt["generator"] if raw_weights else averaged_generator_state(ckpt), "generator")
    except (FileNotFoundError, KeyError, RuntimeError, TypeError, ValueError) as err:
        message = first_line(err)
        raise InputError(message if str(path) in message else f"{path}: {message}") from None
    return gen.eval(), ckpt


@contextmanager
def sampling_mode(gen: nn.Module, bn_mode: str = "eval"):
    """``gen`` in eval mode for sampling; with ``bn_mode="train"`` its BatchNorm layers use batch statistics.

    On exit every module's mode and every BatchNorm's running statistics are as they were (batch
    statistics would otherwise update them).  Under torchrun with ``--sync-bn``, ``"train"`` makes
    the BatchNorm layers wait for the other processes: call it on every rank, or use ``"eval"``.
    """
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    modes = [(module, module.training) for module in gen.modules()]
    norms = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[buffer.clone() for buffer in norm.buffers(recurse=False)] for norm in norms]
    gen.eval()
    if bn_mode == "train":
        for norm in norms:
            norm.train()
    try:
        yield gen
    finally:
        for module, mode in modes:
            module.training = mode
        for norm, buffers in zip(norms, saved):
            for buffer, value in zip(norm.buffers(recurse=False), buffers):
                buffer.copy_(value)


@torch.no_grad()
def generated_batches(gen: nn.Module, n_samples: int, batch_size: int = 32, n_frames: int = 16,
                      level: Optional[int] = None, rng: Optional[torch.Generator] = None,
                      labels: Optional[torch.Tensor] = None, still: bool = False) -> Iterator[torch.Tensor]:
    """Dense samples of ``gen`` in batches ``(B, C, n_frames, H, W)`` in ``[-1, 1]``, ``n_samples`` in all.

    ``labels`` ``(n_samples,)`` are the classes of a conditional generator (see :func:`sample_classes`).
    With ``still``, a motion-warp generator's still frames instead (:meth:`Generator.still_frame`),
    ``(B, C, H, W)``; ``n_frames`` and ``level`` are unused.
    """
    device = next(gen.parameters()).device
    for start in range(0, n_samples, batch_size):
        z = gen.sample_z(min(batch_size, n_samples - start), device, generator=rng)
        y = None if labels is None else labels[start : start + len(z)].to(device)
        frames = gen.still_frame(z, y) if still else gen.generate(z, n_frames=n_frames, level=level, labels=y)
        yield frames.clamp_(-1, 1)


def sample_classes(gen: nn.Module, n_samples: int, rng: Optional[torch.Generator] = None,
                   class_id: Optional[int] = None) -> Optional[torch.Tensor]:
    """Classes ``(n_samples,)`` for a conditional ``gen``: all ``class_id``, or uniformly drawn; ``None`` if unconditional."""
    if not gen.cfg.n_classes:
        return None
    if class_id is not None:
        return torch.full((n_samples,), class_id, dtype=torch.long)
    device = next(gen.parameters()).device
    return gen.sample_labels(n_samples, device, generator=rng).cpu()


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


def downsample_video(x: torch.Tensor) -> torch.Tensor:
    """The authors' 3-D down-sampling of ``(N, C, T, H, W)``.

    Every axis of odd length (length 1 included) is zero-padded by one on each side, then averaged
    over windows of 2 if its original length is > 1, else of 1 — so a length-1 axis grows to 3.
    That is what the original Chainer code does and what its cost table counts.
    """
    sizes = x.shape[2:]
    kernel = tuple(2 if s > 1 else 1 for s in sizes)
    if any(s % 2 for s in sizes):
        # F.pad takes (W, W, H, H, T, T); avg_pool3d's own padding refuses a kernel of 1.
        pads = [p for s in reversed(sizes) for p in (s % 2, s % 2)]
        x = F.pad(x, pads)
    return F.avg_pool3d(x, kernel)


def cpu_bf16_active(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` runs in bf16 on the CPU (explicitly or under autocast)."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class Conv3x3x3(nn.Conv3d):
    """3x3x3 convolution with padding 1: ``(N, C_in, T, H, W) -> (N, C_out, T, H, W)``.

    oneDNN's bf16 CPU kernel (torch 2.14) returns a wrong weight gradient for 2-frame inputs with
    implicit temporal padding, so there the time axis is zero-padded explicitly (same result).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 2 and cpu_bf16_active(x):
            return F.conv3d(F.pad(x, (0, 0, 0, 0, 1, 1)), self.weight, self.bias, padding=(0, 1, 1))
        return super().forward(x)


class OptimizedDisBlock(nn.Module):
    """First discriminator block: ``(N, C, T, H, W) -> (N, ch, T, H/2, W/2)``."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = Conv3x3x3(in_ch, out_ch)
        self.conv2 = Conv3x3x3(out_ch, out_ch)
        self.shortcut = nn.Conv3d(in_ch, out_ch, 1)
        init_conv(self.conv1, math.sqrt(2))
        init_conv(self.conv2, math.sqrt(2))
        init_conv(self.shortcut, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool3d(self.conv2(F.relu(self.conv1(x))), (1, 2, 2))
        return h + self.shortcut(F.avg_pool3d(x, (1, 2, 2)))


class DisBlock(nn.Module):
    """Pre-activation 3-D ResNet block followed by :func:`downsample_video`."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = Conv3x3x3(in_ch, in_ch)
        self.conv2 = Conv3x3x3(in_ch, out_ch)
        self.shortcut = nn.Conv3d(in_ch, out_ch, 1)
        init_conv(self.conv1, math.sqrt(2))
        init_conv(self.conv2, math.sqrt(2))
        init_conv(self.shortcut, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(F.relu(x))))
        return downsample_video(h) + downsample_video(self.shortcut(x))


class VideoDiscriminator(nn.Module):
    """3-D ResNet discriminator of one level: ``(N, C, T, H, W) -> (N,)`` logits.

    With ``n_classes > 0`` it is a projection discriminator: ``<embed(y), features(x)>`` is added
    to the linear output, so the label changes the logit only through that term.
    """

    def __init__(self, in_ch: int, channels: Sequence[int], n_classes: int = 0):
        super().__init__()
        blocks = [OptimizedDisBlock(in_ch, channels[0])]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks.append(DisBlock(c_in, c_out))
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(channels[-1], 1)
        init_conv(self.linear, 1.0)
        self.embed = nn.Embedding(n_classes, channels[-1]) if n_classes else None
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, channels[-1])``: ReLU then a sum over (T, H, W)."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.features(x)
        logits = self.linear(features).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is conditional: labels must be given")
            logits = logits + (self.embed(labels) * features).sum(1)
        return logits


class MultiLevelDiscriminator(nn.Module):
    """One :class:`VideoDiscriminator` per level; logits of all levels concatenated.

    ``forward([x1, ..., xL], [y1, ..., yL])`` returns ``(N_1 + ... + N_L,)``; the labels (one
    ``(N_l,)`` tensor per level, see :func:`level_labels`) are needed only when conditional.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(
            VideoDiscriminator(cfg.out_channels, cfg.dis_channels, cfg.n_classes) for _ in range(cfg.n_levels)
        )

    def forward(self, videos: Sequence[torch.Tensor], labels: Optional[Sequence] = None) -> torch.Tensor:
        if len(videos) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} levels, got {len(videos)}")
        labels = [None] * len(videos) if labels is None else labels
        return torch.cat([dis(x, y) for dis, x, y in zip(self.levels, videos, labels)])


class FrameDiscriminator(nn.Module):
    """2-D discriminator on single frames: ``(N, C, H, W) -> (N,)`` logits, ``H = W`` a multiple of 16.

    Four strided 4x4 convolutions (32 to 256 channels, LeakyReLU 0.2, BatchNorm after all but the
    first), then a linear map of the ``H/16 x W/16`` features; weights drawn from ``N(0, 0.02)``.  A
    cheap judge of still frames: in the default recipe's frame warm-up it teaches the generator to draw
    frames at a fraction of a video iteration's cost (README, "Recipe").  With ``deviation_group`` > 0
    the linear map also reads a minibatch-deviation channel (:func:`minibatch_deviation`), which lets it
    see a batch of frames that all draw the same few digits.
    """

    def __init__(self, in_ch: int, resolution: int, deviation_group: int = 0):
        super().__init__()
        if resolution % 16:
            raise ValueError(f"frame discriminator resolution must be a multiple of 16, got {resolution}")
        if deviation_group < 0:
            raise ValueError(f"deviation_group must be >= 0, got {deviation_group}")
        self.deviation_group = deviation_group
        layers = [nn.Conv2d(in_ch, 32, 4, 2, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in ((32, 64), (64, 128), (128, 256)):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        features = (256 + (1 if deviation_group else 0)) * (resolution // 16) ** 2
        layers += [nn.Flatten(), nn.Linear(features, 1)]
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deviation_group:
            return self.layers(x).squeeze(1)
        h = self.layers[:-2](x)
        h = torch.cat([h, minibatch_deviation(h, self.deviation_group)], 1)
        return self.layers[-2:](h).squeeze(1)


def minibatch_deviation(h: torch.Tensor, group: int) -> torch.Tensor:
    """One feature channel that measures how alike the samples of a batch are: ``(N, C, H, W) -> (N, 1, H, W)``.

    Sample ``i`` joins the group of samples ``i mod (N/g)``, where ``g`` is the largest size up to ``group``
    that divides ``N``; each group's value is the standard deviation over its members, averaged over
    channels and positions, and fills its members' channel.
    """
    n = h.shape[0]
    g = next(k for k in range(min(group, n), 0, -1) if n % k == 0)
    std = (h.float().reshape(g, n // g, *h.shape[1:]).var(0, unbiased=False) + 1e-8).sqrt()
    return std.mean(dim=(1, 2, 3)).repeat(g).to(h.dtype)[:, None, None, None].expand(-1, 1, *h.shape[2:])


def load_weights(module: nn.Module, state: dict, what: str = "model") -> None:
    """``module.load_state_dict(state)`` with a one-line error naming the first mismatch.

    A conditional checkpoint loaded into an unconditional model (or the reverse) is named as such.
    """
    ours, theirs = module.state_dict(), state
    conditional = [any(k.endswith(".scale.weight") or k.endswith(".embed.weight") for k in d) for d in (ours, theirs)]
    if conditional[0] != conditional[1]:
        kinds = ["a conditional" if c else "an unconditional" for c in conditional]
        raise ValueError(f"cannot load {kinds[1]} {what} checkpoint into {kinds[0]} model")
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    if missing or unexpected:
        raise ValueError(f"{what} checkpoint does not match the model: "
                         + (f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"))
    for key, value in ours.items():
        if value.shape != theirs[key].shape:
            raise ValueError(f"{what} checkpoint does not match the model: {key!r} has shape "
                             f"{tuple(theirs[key].shape)}, expected {tuple(value.shape)}")
    module.load_state_dict(state)


def build_models(cfg: ModelConfig):
    """Return ``(Generator(cfg), MultiLevelDiscriminator(cfg))``."""
    return Generator(cfg), MultiLevelDiscriminator(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
