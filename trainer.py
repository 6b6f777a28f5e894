"""The one TGANv2 training loop shared by ``train_movingmnist.py`` and ``train_ucf101.py``.

A train script supplies its defaults, a function that opens its dataset and its ``genSamples``;
everything else (settings, flags, the GAN update, logging, samples, checkpoints, resume) lives here.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import ResumableBatchSampler, to_unit_range
from models import (PRESETS, RIGID_CELL_SETTINGS, FrameDiscriminator, Generator, ModelConfig, averaged_generator_state,
                    build_models, convert_sync_batchnorm, count_parameters, fold_time, level_labels, load_weights,
                    model_config, real_pyramid, sampling_mode)
from utils import (CheckpointError, InputError, OneLineArgumentParser, TensorBoardLog, all_reduce_mean_, append_jsonl,
                   average_gradients, broadcast_module, close_distributed, describe_os_error, discard_torn_checkpoint,
                   discriminator_loss, generator_loss, get_rng_state, init_distributed, int_list, last_good_checkpoint,
                   load_checkpoint, lower_render_loss, non_negative_float, non_negative_int, nonfinite_entries,
                   positive_float, positive_int, prepare_output_folder, previous_checkpoint_path, r1_penalty,
                   report_error, resolve_amp, save_checkpoint, seed_everything, set_rng_state,
                   temporary_checkpoint_path, tensorboard_available, unit_interval, write_json)
# Flags that define the experiment: on --resume they come from the checkpoint, not the command line.
EXPERIMENT_KEYS = ("preset", "n_frames", "batch_size", "lr_g", "lr_d", "beta1", "beta2", "gp_weight",
                   "subsample_frames", "subsample_batch", "lr_decay_start", "seed", "resolution", "dataset", "fold",
                   "split", "sync_bn", "recipe", "content_skip", "motion_warp", "frame_warmup",
                   "warmup_lr", "frame_dis_weight", "frame_dis_group", "rigid_cells", "glyph_average",
                   "video_glyph_average", "still_first_frame", "wall_bounce")

# Settings added after runs were written, with the value those runs used (an older config.json or checkpoint lacks them).
SETTINGS_ADDED_LATER = {"motion_warp": False, "frame_warmup": 0, "warmup_lr": 0.0, "frame_dis_weight": 0.0,
                        "frame_dis_group": 0, "rigid_cells": 0, "glyph_average": 0.0,
                        "video_glyph_average": 0.0, "still_first_frame": False, "wall_bounce": False}

# Frame updates per batch in the frame warm-up: one update takes a tenth of a video step, so two halve the loading.
FRAME_UPDATES_PER_BATCH = 2

# Adam's epsilon as Chainer applies it: added to sqrt(v) before bias correction (the authors' optimiser).
CHAINER_ADAM_EPS = 8e-8

# The authors' R1 weight and batch per process. R1 is a sum over the batch and the adversarial loss a mean, so
# `tuned` keeps weight x batch at theirs: 2 at batch 8, measured better than 0.5 there (README, "Recipe").
AUTHORS_R1_WEIGHT, AUTHORS_BATCH = 0.5, 32

# Training recipes: the authors' exactly (`paper`), and this project's default, chosen by measuring quality at
# equal wall-clock on 64-px moving digits (README, "Recipe").  Explicit flags override a recipe's values.
# The authors' optimiser and precision; `tuned` measured other values of each and kept these.
AUTHORS_SETTINGS = dict(amp="none", lr_g=1e-4, lr_d=1e-4, beta1=0.0, beta2=0.9)
RECIPES = {
    "paper": dict(AUTHORS_SETTINGS, content_skip=False, motion_warp=False, frame_warmup=0, warmup_lr=0.0,
                  frame_dis_weight=0.0, frame_dis_group=0, rigid_cells=0, glyph_average=0.0,
                  video_glyph_average=0.0, still_first_frame=False, wall_bounce=False, gp_weight=AUTHORS_R1_WEIGHT),
    "tuned": dict(AUTHORS_SETTINGS, content_skip=True, motion_warp=True, frame_warmup=7500, warmup_lr=2e-4,
                  frame_dis_weight=0.1, frame_dis_group=4, rigid_cells=1, glyph_average=0.995,
                  video_glyph_average=0.997, still_first_frame=True, wall_bounce=True),
}


class TrainingDiverged(RuntimeError):
    """A loss or a weight became NaN or infinite."""


# Recipe settings that exist only with another one: left unset, each is off when the one it needs is off.  Listed so
# that a setting's own need is settled before it is read.
NEEDS = {"frame_warmup": "motion_warp", "warmup_lr": "motion_warp", "rigid_cells": "motion_warp",
         "glyph_average": "motion_warp", "video_glyph_average": "glyph_average", "still_first_frame": "rigid_cells",
         "wall_bounce": "rigid_cells"}


def apply_recipe(config) -> None:
    """Fill every recipe-controlled setting left unset (``None``) from ``RECIPES[config.recipe]``.

    A recipe without ``gp_weight`` scales the authors' R1 weight by their batch over ``config.batch_size``.
    A setting of :data:`NEEDS` left unset is off (0 or False) when the setting it needs is off: a frame warm-up (and
    its learning rate), rigid cells and a glyph average without the motion warp, a video decay without a glyph
    average, a still first frame and a wall bounce without rigid cells.
    """
    unset = [key for key in NEEDS if getattr(config, key, None) is None]
    for key, value in RECIPES[config.recipe].items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    for key in unset:
        if not getattr(config, NEEDS[key]):
            setattr(config, key, type(getattr(config, key))())
    if config.gp_weight is None:
        config.gp_weight = AUTHORS_R1_WEIGHT * AUTHORS_BATCH / config.batch_size


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the ones both train scripts share.

    The scripts build it from their flags (``--help`` explains each; a script's own defaults override
    these), ``--config RUN/config.json`` from an earlier run's file, benchmark.py and the tests
    directly.  Settings marked *recipe* that are left at ``None`` come from ``RECIPES[recipe]``.
    """

    # The experiment: a resume takes these from the checkpoint (EXPERIMENT_KEYS).
    preset: str = "movingmnist"
    n_frames: int = 16
    batch_size: int = 32
    iterations: int = 10000
    recipe: str = "tuned"
    lr_g: Optional[float] = None  # recipe
    lr_d: Optional[float] = None  # recipe
    beta1: Optional[float] = None  # recipe
    beta2: Optional[float] = None  # recipe
    content_skip: Optional[bool] = None  # recipe
    motion_warp: Optional[bool] = None  # recipe
    frame_warmup: Optional[int] = None  # recipe
    warmup_lr: Optional[float] = None  # recipe: 0 = lr_g and lr_d
    frame_dis_weight: Optional[float] = None  # recipe
    frame_dis_group: Optional[int] = None  # recipe
    rigid_cells: Optional[int] = None  # recipe
    glyph_average: Optional[float] = None  # recipe
    video_glyph_average: Optional[float] = None  # recipe: 0 = glyph_average
    still_first_frame: Optional[bool] = None  # recipe
    wall_bounce: Optional[bool] = None  # recipe
    amp: Optional[str] = None  # recipe: "auto", "none" or "bf16"
    gp_weight: Optional[float] = None  # recipe
    lr_decay_start: int = -1
    subsample_frames: List[int] = field(default_factory=lambda: [2, 2, 2])
    subsample_batch: List[int] = field(default_factory=lambda: [1, 1, 1])
    seed: int = 0
    conditional: bool = False
    sync_bn: bool = True
    # The data (resolution .. cache: video datasets, train_ucf101.py).
    data: str = "auto"
    resolution: Optional[int] = None
    dataset: Optional[str] = None
    fold: Optional[int] = None
    split: Optional[str] = None
    splits: Optional[str] = None
    cache: Optional[str] = None
    # The run.
    out: str = "runs/movingmnist"
    resume: Optional[str] = None
    device: str = "auto"
    compile: bool = False
    channels_last: bool = True
    workers: int = 2
    log_every: int = 10
    sample_every: int = 500
    sample_grid: int = 8
    checkpoint_every: int = 1000
    snapshot_every: int = 1000
    tensorboard: Optional[bool] = None  # None: on when the tensorboard package is installed
    # Evaluation during training (UCF-101 metrics).
    eval_every: int = 0
    eval_metric: str = "video"  # "video": IS / FVD (UCF-101); "digits": evaluate.py digits (Moving MNIST)
    eval_samples: int = 2048
    c3d_weights: Optional[str] = None
    c3d_mean: Optional[str] = None
    i3d: Optional[str] = None
    i3d_stats: Optional[str] = None

    def __post_init__(self):
        apply_recipe(self)


def default_settings() -> dict:
    """:class:`TrainConfig`'s field defaults, the recipe's settings still ``None`` (filled after parsing)."""
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig)}


# What --config RUN/config.json does not take from the earlier run: where to write, and the machine.
NOT_FROM_CONFIG = ("out", "resume", "device")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the scripts' example lines as written and shows every flag's default."""


def build_parser(description: str, defaults: Dict, prog: str, presets: Optional[Sequence[str]] = None,
                 conditional: bool = True, video_metrics: bool = True) -> argparse.ArgumentParser:
    """The training flags, with :class:`TrainConfig`'s defaults overridden by the script's ``defaults``.

    ``presets`` limits ``--preset`` to the networks that fit the script's data; ``conditional``
    offers ``--conditional`` (labelled datasets); ``video_metrics`` offers ``--eval-every`` with the
    C3D (IS) and I3D (FVD) files.  A script without them still gets their :class:`TrainConfig` defaults.
    """
    p = OneLineArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="JSON",
                   help="rerun an experiment: every setting from an earlier run's OUT/config.json except "
                        f"{', '.join('--' + k for k in NOT_FROM_CONFIG)}; flags given here override it")
    p.add_argument("--preset", choices=sorted(presets or PRESETS),
                   help="network sizes (table in docs/METHOD.md, 'Presets')")
    p.add_argument("--data", help="where the training videos come from (see the script's description)")
    p.add_argument("--out", help="run folder: config.json, metrics.jsonl, samples/, checkpoint.pt, snapshots/, "
                                 "tensorboard/")
    p.add_argument("--iterations", type=positive_int, help="total training iterations (one G and one D update each)")
    p.add_argument("--batch-size", type=positive_int, help="clips per iteration (per process under torchrun)")
    p.add_argument("--n-frames", type=positive_int, help="frames per training clip (T)")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="training recipe: 'paper' is the authors' exactly (fp32); 'tuned' is this project's "
                        "default, measured to learn faster per unit of compute; the flags marked 'recipe' override it")
    p.add_argument("--lr-g", type=positive_float, help="Adam learning rate of the generator (recipe)")
    p.add_argument("--lr-d", type=positive_float, help="Adam learning rate of the discriminators (recipe)")
    p.add_argument("--beta1", type=unit_interval, help="Adam beta1 for both networks (recipe)")
    p.add_argument("--beta2", type=unit_interval, help="Adam beta2 for both networks (recipe)")
    p.add_argument("--content-skip", action=argparse.BooleanOptionalAction,
                   help="add z's projection to every ConvLSTM output, so every frame sees the latent (recipe)")
    p.add_argument("--motion-warp", action=argparse.BooleanOptionalAction,
                   help="render one feature map per clip and move it to every frame with flow fields read from "
                        "the ConvLSTM, instead of rendering each frame anew (recipe)")
    p.add_argument("--frame-warmup", type=non_negative_int,
                   help="the first N iterations train only G's still frames (each clip's map rendered without "
                        "motion), two updates per batch against a 2-D discriminator on single real frames, and fit "
                        "the lower render heads to them, down-sampled; the video iterations follow, up to "
                        "--iterations; needs --motion-warp; paper: 0, tuned: 7500 (recipe)")
    p.add_argument("--warmup-lr", type=non_negative_float,
                   help="Adam learning rate of G and the frame discriminator during the frame warm-up; 0 = "
                        "--lr-g and --lr-d; paper: 0 (no warm-up), tuned: 2e-4 (recipe)")
    p.add_argument("--frame-dis-weight", type=non_negative_float,
                   help="in the video iterations a 2-D frame discriminator (the frame warm-up's) judges every frame "
                        "of the last level against the real clips' frames, with R1, one update per iteration; G's "
                        "loss adds this weight times its loss on those frames; 0 = off; paper: 0, tuned: 0.1 "
                        "(recipe)")
    p.add_argument("--frame-dis-group", type=non_negative_int,
                   help="the frame discriminator's linear map also reads the standard deviation of its features "
                        "over groups of N frames of a batch, so it can tell a batch of alike frames from real "
                        "ones; 0 = no such channel; paper: 0 (no frame discriminator), tuned: 4 (recipe)")
    p.add_argument("--rigid-cells", type=non_negative_int,
                   help="dense generation only (sample grids, evaluation, generate.py): draw frame 0 with its flow "
                        "(or as the still frame: --still-first-frame), then carry it to each later frame by one "
                        "displacement per cell of an N x N grid, the ink-weighted mean of the flow's change since "
                        "frame 0, so glyphs keep their shape; 0 = every frame from its own flow; needs --motion-warp; "
                        "paper: 0, tuned: 1, the whole frame as one cell (recipe)")
    p.add_argument("--still-first-frame", action=argparse.BooleanOptionalAction,
                   help="dense generation with rigid cells: frame 0 is the clip's map unmoved (the still frame the "
                        "frame warm-up trains) instead of the map moved by frame 0's flow, and the rigid cells carry "
                        "it to the later frames; needs --rigid-cells above 0; paper: off, tuned: on (recipe)")
    p.add_argument("--wall-bounce", action=argparse.BooleanOptionalAction,
                   help="dense generation with rigid cells: fold each cell's displacement back at the frame's walls, "
                        "so the clip's glyphs bounce off them as real moving digits do instead of leaving the frame; "
                        "needs --rigid-cells above 0; paper: off, tuned: on (recipe)")
    p.add_argument("--glyph-average", type=unit_interval, metavar="DECAY",
                   help="keep an exponential moving average of the weights that draw the glyphs (z's projection, "
                        "content and level blocks, render heads; not the ConvLSTM or the flow head, which move "
                        "them), updated after every iteration with this decay (--video-glyph-average's, when above "
                        "0, after the frame warm-up); sample grids, snapshots, --eval-every, generate.py and "
                        "evaluate.py use it, checkpoints keep it and --resume continues it exactly; 0 = off; needs "
                        "--motion-warp; paper: 0, tuned: 0.995 (recipe)")
    p.add_argument("--video-glyph-average", type=unit_interval, metavar="DECAY",
                   help="the glyph average's decay in the video iterations (those after --frame-warmup), so the "
                        "average keeps more of the warm-up's glyphs; 0 = --glyph-average's; needs --glyph-average; "
                        "paper: 0 (no average), tuned: 0.997 (recipe)")
    p.add_argument("--gp-weight", type=non_negative_float,
                   help="weight of the zero-centred R1 penalty on real data (lambda), a sum over each process's "
                        "batch; paper: 0.5, tuned: 16 / --batch-size, the authors' 0.5 x 32 per sample (recipe)")
    p.add_argument("--lr-decay-start", type=int,
                   help="iteration from which both learning rates decay linearly to 0 at --iterations; -1 = constant")
    p.add_argument("--subsample-frames", type=int_list,
                   help="frame stride between consecutive levels, comma-separated (one per transition)")
    p.add_argument("--subsample-batch", type=int_list,
                   help="batch stride between consecutive levels, comma-separated (1 = keep every sample)")
    p.add_argument("--sample-every", type=positive_int, help="write a GIF sample grid every N iterations")
    p.add_argument("--checkpoint-every", type=positive_int, help="write OUT/checkpoint.pt every N iterations")
    p.add_argument("--snapshot-every", type=non_negative_int,
                   help="write a small G-only snapshot OUT/snapshots/snapshot_XXXXXX.pt every N iterations; "
                        "0 = never")
    p.add_argument("--log-every", type=positive_int,
                   help="update the progress bar, metrics.jsonl and TensorBoard every N iterations (the only host "
                        "sync)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="write TensorBoard events to OUT/tensorboard/ (losses, learning rates, speed, metrics, "
                        "sample grids); default: on when the tensorboard package is installed")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run: from CKPT, or OUT/checkpoint.pt when given without a value")
    p.add_argument("--seed", type=int, help="seed of weights, latents, subsampling offsets and data order")
    p.add_argument("--device", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16"],
                   help="bf16 autocast for the networks (losses and R1 stay fp32); auto = bf16 on GPUs that support "
                        "it, else none: bf16 on a CPU can give non-finite gradients (README, 'Cost and speed'); both "
                        "recipes run fp32, since bf16 lost quality at equal iterations (README, 'Recipe') (recipe)")
    p.add_argument("--workers", type=non_negative_int,
                   help="DataLoader worker processes (0 = load in the main process)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile G and the fake-data pass of D (R1's double backward stays eager); "
                        "on CUDA it needs --no-channels-last")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="channels-last memory layout for the 2-D generator and the 3-D discriminators")
    if video_metrics:
        add_evaluation_flags(p)
    else:
        p.add_argument("--eval-every", type=non_negative_int,
                       help="every N iterations add the moving-digit scores of `evaluate.py digits` (--eval-samples "
                            "samples against 512 procedural real clips) to metrics.jsonl; 0 = never")
        p.add_argument("--eval-samples", type=positive_int, help="generated videos per evaluation")
    if conditional:
        p.add_argument("--conditional", action="store_true",
                       help="class-conditional TGANv2: categorical BatchNorm in G, a projection term in every D "
                            "(needs a labelled dataset)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="under torchrun, compute the generator's BatchNorm statistics over all processes (as the "
                        "authors did); no effect in a single process")
    p.add_argument("--sample-grid", type=positive_int,
                   help="samples are an N x N grid of videos from a fixed latent batch")
    p.set_defaults(**{**default_settings(), **defaults})
    return p


def add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    """``--eval-every`` and the C3D (IS) and I3D (FVD) files it scores with."""
    p.add_argument("--eval-every", type=non_negative_int,
                   help="every N iterations add IS (with --c3d-weights/--c3d-mean) and FVD (with "
                        "--i3d/--i3d-stats) to metrics.jsonl; 0 = never")
    p.add_argument("--eval-samples", type=positive_int, help="generated videos per evaluation (the protocol: 2048)")
    p.add_argument("--c3d-weights", metavar="NPZ", help="the authors' conv3d_deepnetA_ucf.npz (for IS)")
    p.add_argument("--c3d-mean", metavar="NPZ", help="the authors' mean2.npz (for IS)")
    p.add_argument("--i3d", metavar="PT", help="TorchScript I3D (for FVD)")
    p.add_argument("--i3d-stats", metavar="NPZ",
                   help="real-data I3D statistics for FVD, as cached by `evaluate.py fvd --real-videos DIR`")


def parse_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags -> :class:`TrainConfig`; with ``--config FILE`` that run's settings are the defaults."""
    args = parser.parse_args(argv)
    if args.config is not None:
        parser.set_defaults(**read_run_settings(args.config, args.out))
        args = parser.parse_args(argv)
    settings = vars(args)
    del settings["config"]
    return TrainConfig(**settings)


def read_run_settings(path, out) -> dict:
    """The :class:`TrainConfig` settings of an earlier run's ``config.json``, less :data:`NOT_FROM_CONFIG`."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"--config {path}: not a readable JSON file ({err})") from None
    if not isinstance(saved, dict) or "model" not in saved:
        raise InputError(f"--config {path}: not a run's config.json (no 'model' entry)")
    if Path(out).resolve() == path.parent.resolve():
        raise InputError(f"--config {path}: --out {out} is that run's own folder; pass a new --out "
                         "(or --resume to continue that run)")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(NOT_FROM_CONFIG)
    return {k: v for k, v in {**SETTINGS_ADDED_LATER, **saved}.items() if k in names}


def linear_decay(base_lr: float, iteration: int, start: int, total: int) -> float:
    """Learning rate at ``iteration``: constant before ``start``, then linear to 0 at ``total``."""
    if start < 0 or iteration < start:
        return base_lr
    return base_lr * max(0.0, 1.0 - (iteration - start) / max(1, total - start))


class Trainer:
    """Holds the networks, optimizers and the update (docs/METHOD.md, 'Training step').

    ``step(x_real)`` runs one iteration on real clips ``(N, C, T, H, W)`` and returns the losses as
    0-dim device tensors (no host sync).  Under torchrun, gradients are averaged across processes
    after each backward; each process's R1 term is a sum over its own batch (see the README).
    """

    def __init__(self, cfg: ModelConfig, config: TrainConfig, device: torch.device):
        if config.compile and config.channels_last and device.type == "cuda":
            # torch.compile's convolution backward expects NCHW weight gradients where cuDNN returns channels-last.
            raise ValueError("--compile with --channels-last stops on CUDA with a stride mismatch inside torch's "
                             "compiled convolution backward; add --no-channels-last")
        self.cfg, self.config, self.device = cfg, config, device
        gen, dis = build_models(cfg)
        if config.sync_bn:
            convert_sync_batchnorm(gen)
        self.channels_last = config.channels_last
        if self.channels_last:
            gen, dis = gen.to(memory_format=torch.channels_last), dis.to(memory_format=torch.channels_last_3d)
        self.gen, self.dis = gen.to(device), dis.to(device)
        # Compiled graphs do not support the double backward of R1, so D runs eagerly on real data.
        self.gen_forward = torch.compile(self.gen) if config.compile else self.gen
        self.dis_fake = torch.compile(self.dis) if config.compile else self.dis
        adam = dict(betas=(config.beta1, config.beta2), eps=CHAINER_ADAM_EPS)
        if device.type == "cuda":
            adam["fused"] = True  # one kernel for all parameters
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune every convolution once
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=config.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.dis.parameters(), lr=config.lr_d, **adam)
        self.dis_params = list(self.dis.parameters())
        self.frame_dis = self.opt_frame = None
        if config.frame_warmup and not cfg.motion_warp:
            raise ValueError("--frame-warmup needs a motion-warp generator (--motion-warp)")
        if config.frame_warmup or config.frame_dis_weight:
            self.frame_dis = FrameDiscriminator(cfg.out_channels, cfg.resolutions[-1], config.frame_dis_group).to(device)
            # Not the authors' network, so torch's Adam epsilon rather than Chainer's.
            self.opt_frame = torch.optim.Adam(self.frame_dis.parameters(), lr=config.lr_d,
                                              betas=(config.beta1, config.beta2), fused=device.type == "cuda")
        if config.frame_warmup:
            self.still_params = self.gen.still_frame_parameters()
            self.lower_head_params = [p for head in self.gen.renders[:-1] for p in head.parameters()]
        if config.glyph_average and not cfg.motion_warp:
            raise ValueError("--glyph-average needs a motion-warp generator (--motion-warp)")
        self.gen_average = None
        if config.glyph_average:
            # The sampling copy of G: its glyph path holds the average, its other weights are copied from G when used.
            self.gen_average = copy.deepcopy(self.gen).requires_grad_(False)
            self.average_keys = keys = self.gen.glyph_state_keys()
            ours, averaged = self.gen.state_dict(), self.gen_average.state_dict()
            self.average_pairs = ([averaged[k] for k in keys], [ours[k] for k in keys])
            self.copied_pairs = [(averaged[k], v) for k, v in ours.items() if k not in keys]
        self.iteration = 0
        self.amp = resolve_amp(config.amp, device)
        bf16 = self.amp == "bf16"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def set_iteration(self, iteration: int) -> None:
        """Prepare the update of 0-based ``iteration``: learning rates (``warmup_lr`` for G and the frame
        discriminator in the frame warm-up) and Adam's epsilon."""
        a = self.config
        self.iteration = iteration
        # Chainer's eps on sqrt(v) before bias correction equals eps / sqrt(1 - beta2^t) after it.
        eps = CHAINER_ADAM_EPS / math.sqrt(1.0 - a.beta2 ** (iteration + 1)) if a.beta2 < 1 else CHAINER_ADAM_EPS
        warmup_lr = a.warmup_lr if iteration < a.frame_warmup else 0.0  # 0: the video iterations' rates
        for opt, base in ((self.opt_g, warmup_lr or a.lr_g), (self.opt_d, a.lr_d)):
            for group in opt.param_groups:
                group["lr"] = linear_decay(base, iteration, a.lr_decay_start, a.iterations)
                group["eps"] = eps
        if self.opt_frame is not None:
            for group in self.opt_frame.param_groups:
                group["lr"] = linear_decay(warmup_lr or a.lr_d, iteration, a.lr_decay_start, a.iterations)

    def step(self, x_real: torch.Tensor, labels: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
             fake_labels: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One G update and one D update; during the frame warm-up, frame updates instead (:meth:`frame_step`).

        ``labels`` ``(N,)`` are the real clips' classes (conditional models only); ``z`` and
        ``fake_labels`` default to fresh ``U(-1, 1)`` latents and uniformly drawn classes.  With
        ``frame_dis_weight`` the frame discriminator also judges every frame of the last level: G's
        loss adds the weight times ``loss_frame_g``, and after D's update it takes one of its own
        (:meth:`update_frame_dis`).  Returns 0-dim losses: ``loss_g`` (the video discriminators'),
        ``loss_d`` and ``r1``, with ``loss_frame_g`` and ``loss_frame_d`` under a frame discriminator
        weight; only ``loss_frame_d`` during the warm-up.
        """
        cfg = self.cfg
        if (labels is not None) != bool(cfg.n_classes):
            raise ValueError("labels are needed by a conditional model and only by one")
        if self.iteration < self.config.frame_warmup:
            frame_losses = [self.frame_step(x_real) for _ in range(FRAME_UPDATES_PER_BATCH)]
            self.update_average()
            return {"loss_frame_d": torch.stack(frame_losses).mean()}
        if self.channels_last:
            x_real = x_real.contiguous(memory_format=torch.channels_last_3d)
        real = real_pyramid(x_real, cfg.subsample_frames, cfg.subsample_batch)
        real = [x.detach().requires_grad_(True) for x in real]
        real_labels = level_labels(labels, cfg.subsample_batch)
        z = self.gen.sample_z(x_real.shape[0]) if z is None else z
        if fake_labels is None:
            fake_labels = self.gen.sample_labels(x_real.shape[0])
        with self.autocast():
            y_real = self.dis(real, real_labels)
            fake = self.gen_forward(z, labels=fake_labels)
            # D sees a detached copy so the generator graph can be freed right after its backward.
            fake_in = [x.detach().requires_grad_(True) for x in fake]
            y_fake = self.dis_fake(fake_in, level_labels(fake_labels, cfg.subsample_batch))

        # 1. generator: gradient of L_G w.r.t. the renders, then through G only (D's grads discarded).
        loss_g = generator_loss(y_fake)
        weight, frame_losses, loss_total = self.config.frame_dis_weight, {}, loss_g
        if weight:
            fake_frames = fold_time(fake_in[-1])
            with self.autocast():
                y_frames = self.frame_dis(fake_frames)
            frame_losses["loss_frame_g"] = generator_loss(y_frames)
            loss_total = loss_g + weight * frame_losses["loss_frame_g"]
        grad_fake = torch.autograd.grad(loss_total, fake_in, retain_graph=True)
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(fake, grad_fake)
        average_gradients(self.gen.parameters())
        self.opt_g.step()

        # 2. discriminator on the same forward passes, plus R1 on the real pyramid.
        loss_adv = discriminator_loss(y_real, y_fake)
        r1 = r1_penalty(y_real, real)
        loss_d = loss_adv + self.config.gp_weight * r1
        self.opt_d.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_d, inputs=self.dis_params)
        average_gradients(self.dis_params)
        self.opt_d.step()
        # 3. the frame discriminator on the last level's frames, R1 on the real ones.
        if weight:
            real_frames = fold_time(real[-1].detach()).requires_grad_(True)
            frame_losses["loss_frame_d"] = self.update_frame_dis(real_frames, fake_frames.detach())
        losses = {"loss_g": loss_g, "loss_d": loss_adv, "r1": r1, **frame_losses}
        self.update_average()
        return {name: value.detach() for name, value in losses.items()}

    @torch.no_grad()
    def update_average(self) -> None:
        """With ``--glyph-average d``: each averaged tensor ``a`` of the glyph path moves to ``d * a + (1 - d) * w``,
        ``w`` G's tensor after this iteration; ``d`` is ``--video-glyph-average`` (when above 0) after the warm-up."""
        if self.gen_average is not None:
            video = self.iteration >= self.config.frame_warmup and self.config.video_glyph_average
            decay = self.config.video_glyph_average if video else self.config.glyph_average
            torch._foreach_lerp_(*self.average_pairs, 1.0 - decay)

    @torch.no_grad()
    def sampling_generator(self) -> Generator:
        """The generator that sample grids, snapshots and evaluations use: G itself, or with ``--glyph-average``
        its copy that holds the glyph path's average and, copied now, G's other weights (ConvLSTM, flow head)."""
        if self.gen_average is None:
            return self.gen
        for averaged, ours in self.copied_pairs:
            averaged.copy_(ours)
        return self.gen_average

    def generator_state(self) -> dict:
        """``generator``: G's weights; with ``--glyph-average`` also ``generator_average``, the glyph path's average
        (:func:`models.load_generator` puts it in place of G's own)."""
        state = {"generator": self.gen.state_dict()}
        if self.gen_average is not None:
            averaged = self.gen_average.state_dict()
            state["generator_average"] = {k: averaged[k] for k in self.average_keys}
        return state

    def frame_step(self, x_real: torch.Tensor) -> torch.Tensor:
        """One update of the frame discriminator, then one of G's still frames against it.

        Real frames are one random frame of each clip of ``x_real`` ``(N, C, T, H, W)``; fakes are
        ``N`` fresh still frames (:meth:`models.Generator.still_frame`); R1 weighs as in :meth:`step`.
        In the same G update the lower render heads learn to draw the still frame, average-pooled to
        their level (:func:`utils.lower_render_loss`).  Only the parameters that draw still frames and
        those heads move: the flow and the video discriminators do not.  Returns the frame
        discriminator's adversarial loss (a 0-dim tensor).
        """
        n, device = x_real.shape[0], x_real.device
        pick = torch.randint(x_real.shape[2], (n,), device=device)
        real = x_real[torch.arange(n, device=device), :, pick].contiguous().detach().requires_grad_(True)
        z = self.gen.sample_z(n)
        labels = self.gen.sample_labels(n)
        with self.autocast():
            maps = self.gen.still_maps(z, labels)
            fake = self.gen.renders[-1](maps[-1], labels)
        loss_adv = self.update_frame_dis(real, fake.detach())

        with self.autocast():
            loss_g = generator_loss(self.frame_dis(fake))
            # The video iterations then start with every level drawing the same picture, not untrained noise.
            lower = [head(m.detach(), labels) for head, m in zip(self.gen.renders[:-1], maps[:-1])]
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_g, inputs=self.still_params)
        torch.autograd.backward(lower_render_loss(lower, fake.detach()), inputs=self.lower_head_params)
        average_gradients(self.still_params + self.lower_head_params)
        self.opt_g.step()
        return loss_adv

    def update_frame_dis(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One update of the frame discriminator: real frames ``(M, C, H, W)`` (a leaf that requires grad,
        for R1 at ``gp_weight``) against fake frames ``(M', C, H, W)`` (detached), non-saturating loss.
        Returns its adversarial loss, detached (a 0-dim tensor)."""
        with self.autocast():
            y_real = self.frame_dis(real)
            y_fake = self.frame_dis(fake)
        loss_adv = discriminator_loss(y_real, y_fake)
        loss_d = loss_adv + self.config.gp_weight * r1_penalty(y_real, [real])
        self.opt_frame.zero_grad(set_to_none=True)
        loss_d.backward()
        average_gradients(self.frame_dis.parameters())
        self.opt_frame.step()
        return loss_adv.detach()

    def state_dict(self) -> dict:
        state = {**self.generator_state(), "discriminator": self.dis.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}
        if self.frame_dis is not None:
            state.update(frame_discriminator=self.frame_dis.state_dict(), opt_frame=self.opt_frame.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        load_weights(self.gen, state["generator"], "generator")
        if self.gen_average is not None:  # a checkpoint without an average (none kept yet) starts it at G's weights
            load_weights(self.gen_average, averaged_generator_state(state), "generator average")
        load_weights(self.dis, state["discriminator"], "discriminator")
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.frame_dis is not None:
            load_weights(self.frame_dis, state["frame_discriminator"], "frame discriminator")
            self.opt_frame.load_state_dict(state["opt_frame"])


def any_rank(flag: bool, world_size: int, device) -> bool:
    """Whether ``flag`` is true on any process (a collective call when ``world_size > 1``)."""
    if world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    all_reduce_mean_([value])
    return bool(value.item() > 0)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag so the loop can finish its step, checkpoint and exit 0.

    Python runs signal handlers only between bytecodes, so a long torch op would delay them for
    minutes.  A watcher thread therefore reads every signal from the interpreter's wakeup fd as it
    arrives: a second one, ``REPEAT_AFTER_S`` or more after the first, ends the process at once
    (exit 128 + signal number).  Saves are atomic, so that never leaves a partial checkpoint; a torn
    ``*.pt.tmp`` of ``checkpoint`` (a save cut short) is removed on the way out.
    Closer repeats are the same request delivered twice (a terminal's Ctrl-C reaches torchrun and
    its workers, and torchrun forwards it again), not a second request.
    """

    REPEAT_AFTER_S = 1.0
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second: str = "the last checkpoint written is intact; continue with --resume",
                 checkpoint: Optional[Path] = None):
        self.signal_name: Optional[str] = None
        self.on_second = on_second
        self.checkpoint = checkpoint

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-request", daemon=True).start()
        return self

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def _watch(self) -> None:
        try:
            self._count_signals()
        finally:
            os.close(self._read_fd)

    def _count_signals(self) -> None:
        first = None
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:  # the context was left
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                elif now - first >= self.REPEAT_AFTER_S:
                    name = signal.Signals(signum).name
                    os.write(2, f"\n{name} again: stopping at once, without a new checkpoint; {self.on_second}\n"
                             .encode())
                    if self.checkpoint is not None:
                        discard_torn_checkpoint(self.checkpoint)
                    os._exit(128 + signum)

    def agreed(self, world_size: int, device) -> bool:
        """Whether any process was signalled (a collective call when ``world_size > 1``)."""
        return any_rank(self.signal_name is not None, world_size, device)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns
        for s, handler in self._old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, but only the main process
    should react (finish the step, checkpoint); workers exit on their own when it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resolve_resume(config: TrainConfig) -> Optional[dict]:
    """Load the checkpoint named by ``--resume`` and put its experiment settings into ``config``."""
    if config.resume is None:
        return None
    path = Path(config.out) / "checkpoint.pt" if config.resume == "auto" else Path(config.resume)
    if path.is_dir():
        raise InputError(f"--resume {path}: a folder; expected a checkpoint file such as {path / 'checkpoint.pt'}")
    if not any(p.exists() for p in (path, previous_checkpoint_path(path), temporary_checkpoint_path(path))):
        raise FileNotFoundError(f"--resume: checkpoint {path} not found")
    try:
        ckpt = load_checkpoint(path, repair=True)  # never resumes from a non-finite or unreadable file
    except CheckpointError as err:
        raise CheckpointError(f"--resume: {err}") from None
    saved = {**SETTINGS_ADDED_LATER, **ckpt["config"]}
    if bool(saved.get("conditional")) != config.conditional:
        held = (f"a conditional model ({saved['model']['n_classes']} classes)" if saved.get("conditional")
                else "an unconditional model")
        raise ValueError(f"--resume: {path} holds {held}; "
                         f"{'pass' if saved.get('conditional') else 'drop'} --conditional to continue it")
    if "generator_ema" in ckpt:  # written by --ema-decay, an option since removed
        raise ValueError(f"--resume: {path} holds an average of G's weights (--ema-decay), which this version no "
                         "longer keeps; resuming would drop it (generate.py and evaluate.py still read its G)")
    # --data left at auto continues on the run's data: a procedural run must not switch to a download mid-run.
    if config.data == "auto" and saved.get("data", "auto") != "auto":
        print(f"--resume: using data={saved['data']!r} from the checkpoint (pass --data to change it)", file=sys.stderr)
        config.data = saved["data"]
    for key in EXPERIMENT_KEYS:
        if key in saved and getattr(config, key) != saved[key]:
            print(f"--resume: using {key}={saved[key]!r} from the checkpoint", file=sys.stderr)
            setattr(config, key, saved[key])
    return ckpt


def check_clip_geometry(config: TrainConfig) -> None:
    """Every level must keep at least one frame and one clip: ``--n-frames`` >= the product of
    ``--subsample-frames`` and ``--batch-size`` >= the product of ``--subsample-batch``."""
    for flag, value, strides_flag, strides in (
            ("--n-frames", config.n_frames, "--subsample-frames", config.subsample_frames),
            ("--batch-size", config.batch_size, "--subsample-batch", config.subsample_batch)):
        needed = math.prod(strides)
        if value < needed:
            raise InputError(f"{flag} {value}: {strides_flag} {','.join(map(str, strides))} leaves "
                             f"{value // needed} at the last level; expected at least {needed}")


def check_warp_settings(config: TrainConfig) -> None:
    """Still frames, a glyph average and rigid cells exist only in a motion-warp generator: ``--frame-warmup``,
    ``--glyph-average`` and ``--rigid-cells`` above 0 need ``--motion-warp``; ``--video-glyph-average`` above 0 needs
    a glyph average and ``--still-first-frame`` and ``--wall-bounce`` rigid cells."""
    if config.frame_warmup and not config.motion_warp:
        raise InputError(f"--frame-warmup {config.frame_warmup}: still frames need the motion warp; add "
                         "--motion-warp or pass --frame-warmup 0")
    if config.glyph_average and not config.motion_warp:
        raise InputError(f"--glyph-average {config.glyph_average}: the glyph path exists only in a motion-warp "
                         "generator; add --motion-warp or pass --glyph-average 0")
    if config.video_glyph_average and not config.glyph_average:
        raise InputError(f"--video-glyph-average {config.video_glyph_average}: a decay of the glyph average, which is "
                         "off; pass --glyph-average DECAY above 0 or --video-glyph-average 0")
    if config.rigid_cells and not config.motion_warp:
        raise InputError(f"--rigid-cells {config.rigid_cells}: rigid cells carry a motion-warp generator's frame 0; "
                         "add --motion-warp or pass --rigid-cells 0")
    for name, reason in RIGID_CELL_SETTINGS.items():
        if getattr(config, name) and not config.rigid_cells:
            flag = name.replace("_", "-")
            raise InputError(f"--{flag}: {reason}; pass --rigid-cells N above 0 or --no-{flag}")


def load_eval_models(config: TrainConfig, device):
    """The evaluation networks ``--eval-every`` needs, or ``None`` when evaluation is off."""
    if not config.eval_every or config.eval_metric != "video":
        return None
    from evaluate import EvalModels, load_c3d, load_i3d, load_statistics

    if bool(config.c3d_weights) != bool(config.c3d_mean) or bool(config.i3d) != bool(config.i3d_stats):
        raise ValueError("--eval-every: give --c3d-weights with --c3d-mean, and --i3d with --i3d-stats")
    if not (config.c3d_weights or config.i3d):
        raise ValueError("--eval-every needs --c3d-weights/--c3d-mean (IS) or --i3d/--i3d-stats (FVD)")
    return EvalModels(c3d=load_c3d(config.c3d_weights, config.c3d_mean, device) if config.c3d_weights else None,
                      i3d=load_i3d(config.i3d, device) if config.i3d else None,
                      i3d_stats=load_statistics(config.i3d_stats, "i3d") if config.i3d_stats else None)


def gather_rng_states(world_size: int) -> list:
    """Every process's RNG state, in rank order (collective when ``world_size > 1``)."""
    state = get_rng_state()
    if world_size == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


# Seconds of training after which a run writes its first sample grid if --sample-every has not come yet.
FIRST_SAMPLE_AFTER_S = 120.0


def describe_run(device: torch.device, amp: str, world_size: int, batch_size: int, iterations: int) -> str:
    """A line saying what a run is about to do (device, precision, threads, batch, length); a warning for CPU bf16."""
    precision = "bf16 autocast" if amp == "bf16" else "fp32"
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    procs = f" x {world_size} processes" if world_size > 1 else ""
    line = f"training on {device}{procs} ({precision}{threads}): {iterations} iterations at batch {batch_size}"
    if amp == "bf16" and device.type == "cpu":
        line += ("\nwarning: --amp bf16 on a CPU: oneDNN's bf16 3-D convolutions give non-finite weight gradients "
                 "on some CPUs; if the run stops on a non-finite loss, use --amp none")
    return line


def describe_speed(it_per_s: float, remaining: int, what: str = "iterations") -> str:
    """``"speed 1.62 it/s: the remaining 2900 iterations take about 0:29:50"``; ``what`` names the iterations."""
    seconds = int(remaining / max(it_per_s, 1e-9))
    return (f"speed {it_per_s:.2f} it/s: the remaining {remaining} {what} take about "
            f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")


# TensorBoard tags of the metrics.jsonl keys; evaluation scores go under "metrics/".
BOARD_TAGS = {"loss_g": "loss/G", "loss_d": "loss/D", "r1": "loss/R1", "loss_frame_g": "loss/frame_G",
              "loss_frame_d": "loss/frame_D",
              "lr_g": "learning_rate/G", "lr_d": "learning_rate/D", "it_per_s": "speed/iterations_per_second"}

# Progress-bar names of the losses.
BAR_NAMES = {"loss_g": "L_G", "loss_d": "L_D", "r1": "R1", "loss_frame_g": "L_G(frame)", "loss_frame_d": "L_D(frame)"}


class LossMeter:
    """Running means of the losses :meth:`Trainer.step` returns (L_G, L_D's adversarial part and R1, and
    the frame discriminator's L_G and L_D) since the last :meth:`read`, kept on the device.

    Each loss is averaged over the steps that returned it.  Also measures training speed: time spent
    inside :meth:`paused` (samples, checkpoints) is not counted.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.count, self.since = 0, time.perf_counter()

    def add(self, losses: Dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, torch.zeros((), device=self.device)) + value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.count += 1

    @contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.since += time.perf_counter() - began

    def read(self) -> Dict[str, float]:
        """The means over all processes (a collective call under torchrun) and ``it_per_s``; then starts anew."""
        values = {}
        if self.sums:  # every process is in the same phase, so all hold the same names
            sums = torch.stack(list(self.sums.values()))
            all_reduce_mean_([sums])
            values = {name: total / self.counts[name] for name, total in zip(self.sums, sums.tolist())}
        now = time.perf_counter()
        values["it_per_s"] = self.count / max(now - self.since, 1e-9)
        self.sums, self.counts = {}, {}
        self.count, self.since = 0, now
        return values


def conditional_classes(config: TrainConfig, dataset, describe_data: str) -> List[str]:
    """The class names a conditional run trains on (``[]`` for an unconditional one)."""
    if not config.conditional:
        return []
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError(f"--conditional needs a labelled dataset; {describe_data or type(dataset).__name__} "
                         "has no classes")
    return classes


def build_trainer(config: TrainConfig, n_classes: int, device: torch.device, rank: int) -> Trainer:
    """The networks and optimisers, identical on every process; then seeds each process's own streams."""
    seed_everything(config.seed)
    cfg = model_config(config.preset, resolution=config.resolution, n_frames=config.n_frames,
                       subsample_frames=config.subsample_frames, subsample_batch=config.subsample_batch,
                       n_classes=n_classes, content_skip=config.content_skip,
                       motion_warp=config.motion_warp, rigid_cells=config.rigid_cells,
                       still_first_frame=config.still_first_frame, wall_bounce=config.wall_bounce)
    trainer = Trainer(cfg, config, device)
    broadcast_module(trainer.gen)
    broadcast_module(trainer.dis)
    if trainer.gen_average is not None:
        broadcast_module(trainer.gen_average)
    seed_everything(config.seed + 1_000_003 * rank)  # different latents and offsets per process
    return trainer


def restore(trainer: Trainer, ckpt: Optional[dict], seed: int, rank: int, world_size: int) -> int:
    """Load a resumed checkpoint's state and RNG streams into ``trainer``; returns the iteration to start at."""
    if ckpt is None:
        return 0
    trainer.load_state_dict(ckpt)
    start = int(ckpt["iteration"])
    states = ckpt["rng"]
    if len(states) == world_size:
        set_rng_state(states[rank])
    else:
        print(f"--resume: checkpoint written by {len(states)} processes, now {world_size}; "
              "latent and offset streams are reseeded (data order is kept)", file=sys.stderr)
        seed_everything(seed + 1_000_003 * rank + start)
    return start


def device_batches(dataset, config: TrainConfig, start: int, rank: int, world_size: int,
                   device: torch.device) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Endless ``(clips (N, C, T, H, W) in [-1, 1], labels (N,) or None)`` on ``device``, from iteration ``start``."""
    sampler = ResumableBatchSampler(len(dataset), config.batch_size, config.seed, start_iteration=start,
                                    rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.workers,
                        pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(config.seed))  # keeps the global RNG untouched
    for batch in loader:
        clips, labels = (batch[0], batch[1].to(device, non_blocking=True)) if config.conditional else (batch, None)
        yield to_unit_range(clips.to(device, non_blocking=True)), labels  # uint8 until here: 4x less traffic


def write_run_config(out: Path, record: dict, start: int) -> Path:
    """``OUT/config.json`` for a new run; a resume keeps it and adds ``OUT/config.resume-XXXXXX.json`` (its start)."""
    path = out / ("config.json" if start == 0 else f"config.resume-{start:06d}.json")
    write_json(path, record)
    return path


class Run:
    """One training run's outputs: what the loop writes besides the update, on the main process.

    Holds the run record (``config.json``, stored in every checkpoint), the fixed sample latents,
    the evaluation networks and the TensorBoard log.  Collective steps (checkpoint RNG states,
    loss means) involve every process; files are written by rank 0 only.
    """

    def __init__(self, config: TrainConfig, trainer: Trainer, gen_samples: Callable, classes: List[str],
                 describe_data: str, rank: int, world_size: int, start: int):
        self.config, self.trainer, self.gen_samples = config, trainer, gen_samples
        self.out, self.rank, self.world_size = Path(config.out), rank, world_size
        self.is_main = rank == 0
        device = trainer.device
        record = dict(dataclasses.asdict(config), model=trainer.cfg.to_dict(), classes=classes or None,
                      device=str(device), amp=trainer.amp, world_size=world_size, data_description=describe_data,
                      params={"generator": count_parameters(trainer.gen),
                              "discriminator": count_parameters(trainer.dis)},
                      torch_version=str(torch.__version__))
        self.record = json.loads(json.dumps(record))  # plain values only: checkpoints load with weights_only=True
        self.fixed_z = trainer.gen.sample_z(config.sample_grid**2, device="cpu",
                                            generator=torch.Generator().manual_seed(config.seed)).to(device)
        self.fixed_labels = None
        if classes:  # one row per class, rows spread evenly over the class list
            rows = torch.linspace(0, len(classes) - 1, config.sample_grid).round().long()
            self.fixed_labels = rows.repeat_interleave(config.sample_grid).to(device)
        self.eval_models = load_eval_models(config, device) if self.is_main else None
        if config.tensorboard and not tensorboard_available():
            raise InputError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
        self.board = None
        if self.is_main:
            write_run_config(self.out, self.record, start)
            if config.tensorboard or (config.tensorboard is None and tensorboard_available()):
                self.board = TensorBoardLog(self.out / "tensorboard")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.board is not None:
            self.board.close()

    def log(self, iteration: int, values: Dict[str, float]) -> dict:
        """Record the loss means of :meth:`LossMeter.read` (metrics.jsonl, TensorBoard); stop on NaN or inf."""
        losses = {k: v for k, v in values.items() if k != "it_per_s"}
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(
                f"non-finite loss at iteration {iteration} ({', '.join(f'{k}={v}' for k, v in losses.items())}); "
                "stopped without saving. " + (last_good_checkpoint(self.out / "checkpoint.pt") if self.is_main else "")
            )
        record = {"iteration": iteration, **losses, "lr_g": self.trainer.opt_g.param_groups[0]["lr"],
                  "lr_d": self.trainer.opt_d.param_groups[0]["lr"], "it_per_s": values["it_per_s"]}
        self.write_metrics(record)
        return record

    def write_metrics(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl and its numbers to TensorBoard (main process)."""
        if not self.is_main:
            return
        append_jsonl(self.out / "metrics.jsonl", record)
        if self.board is not None:
            numbers = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
            self.board.scalars(record["iteration"], {BOARD_TAGS.get(k, f"metrics/{k}"): v for k, v in numbers.items()})

    def sample(self, iteration: int) -> None:
        """A sample grid through the script's ``genSamples``, in eval mode."""
        if not self.is_main:
            return
        trainer = self.trainer
        gen = trainer.sampling_generator()
        with sampling_mode(gen), torch.no_grad(), trainer.autocast():
            path = self.gen_samples(gen, self.fixed_z, iteration, self.out, self.fixed_labels,
                                    n_frames=trainer.cfg.n_frames)
        if self.board is not None and path is not None and Path(path).suffix == ".gif":
            self.board.gif("samples", path, iteration)

    def evaluate(self, iteration: int) -> None:
        """IS / FVD, or the moving-digit scores, of G into metrics.jsonl and TensorBoard."""
        if not self.is_main:
            return
        from evaluate import digit_metrics_for_generator, evaluate_generator

        gen = self.trainer.sampling_generator()
        if self.config.eval_metric == "digits":
            scores = digit_metrics_for_generator(gen, n_samples=self.config.eval_samples,
                                                 n_frames=self.trainer.cfg.n_frames, seed=self.config.seed)
        else:
            scores = evaluate_generator(gen, self.eval_models, n_samples=self.config.eval_samples,
                                        n_frames=self.trainer.cfg.n_frames, seed=self.config.seed)
        record = {"iteration": iteration, **{k: v for k, v in scores.items() if not k.endswith("_runs")}}
        self.write_metrics(record)
        shown = ("IS", "FVD", "accuracy", "identity_consistency", "frechet_distance", "motion_ratio")
        tqdm.write(f"iteration {iteration}: " + ", ".join(f"{k} {record[k]:.3f}" for k in shown if k in record))

    def snapshot(self, iteration: int) -> None:
        """``OUT/snapshots/snapshot_XXXXXX.pt``: G's weights (and their glyph average), the iteration and the config."""
        if self.is_main:
            state = {**self.trainer.generator_state(), "iteration": iteration, "config": self.record}
            save_checkpoint(state, self.out / "snapshots" / f"snapshot_{iteration:06d}.pt", keep_previous=False)

    def checkpoint(self, iteration: int) -> None:
        """``OUT/checkpoint.pt``, refused (:class:`TrainingDiverged`) when any tensor on any process is not finite."""
        rng = gather_rng_states(self.world_size)  # collective: every rank takes part
        state = self.trainer.state_dict()
        bad = nonfinite_entries(state)  # on every rank, so that all of them stop together
        if any_rank(bool(bad), self.world_size, self.trainer.device):
            found = f"values in {', '.join(bad)}" if bad else "values on another rank"
            raise TrainingDiverged(f"non-finite {found} at iteration {iteration}; stopped without saving. "
                                   + (last_good_checkpoint(self.out / "checkpoint.pt") if self.is_main else ""))
        if self.is_main:
            state.update(iteration=iteration, config=self.record, rng=rng)
            save_checkpoint(state, self.out / "checkpoint.pt")


def train(config: TrainConfig, dataset, gen_samples: Callable, describe_data: str = "", ckpt: Optional[dict] = None,
          quick_start: str = "") -> dict:
    """Run the training loop on ``dataset`` (uint8 clips ``(C, T, H, W)`` keyed by ``(index, seed)``).

    ``ckpt`` is the checkpoint to continue from (see :func:`resolve_resume`); ``quick_start`` is the
    command printed when there is no GPU.  Writes what README's "What a run writes" lists (on rank 0
    only under torchrun), and under torchrun leaves the process group at the end, all ranks together.
    Returns the last logged metrics.
    """
    rank, world_size, device = init_distributed(config.device)
    classes = conditional_classes(config, dataset, describe_data)
    trainer = build_trainer(config, len(classes), device, rank)
    start = restore(trainer, ckpt, config.seed, rank, world_size)
    batches = device_batches(dataset, config, start, rank, world_size, device)
    meter = LossMeter(device)
    if rank == 0:
        print(describe_run(device, trainer.amp, world_size, config.batch_size, config.iterations - start),
              file=sys.stderr)
        if device.type == "cpu" and quick_start:
            print(f"No GPU: a full run takes hours here. For a first result on a CPU, run:\n    {quick_start}",
                  file=sys.stderr)
    bar = tqdm(total=config.iterations, initial=start, dynamic_ncols=True, desc=Path(config.out).name,
               disable=rank != 0)
    last: dict = {}
    t_start, sampled_at, speed_said = time.perf_counter(), None, set()
    checkpoint_path = Path(config.out) / "checkpoint.pt"
    # closing(): loader workers ignore SIGTERM, so on an error only this shuts them down; left alive they block exit.
    with closing(batches), Run(config, trainer, gen_samples, classes, describe_data, rank, world_size, start) as run, \
            StopRequest(f"{checkpoint_path} is intact; continue with --resume", checkpoint_path) as stop:
        for iteration in range(start + 1, config.iterations + 1):
            x_real, labels = next(batches)
            trainer.set_iteration(iteration - 1)
            meter.add(trainer.step(x_real, labels))
            bar.update(1)
            log_now = iteration % config.log_every == 0 or iteration == config.iterations
            # Alone, the flag is read every step; under torchrun the ranks agree at log steps only.
            stopping = stop.agreed(world_size, device) if (log_now or world_size == 1) else False
            if log_now or stopping:
                last = run.log(iteration, meter.read())
                bar.set_postfix({BAR_NAMES[k]: f"{v:.3f}" for k, v in last.items() if k in BAR_NAMES})
                # Speed and time to finish once per phase: a frame warm-up iteration is several times faster.
                warming = iteration <= config.frame_warmup
                began, ends = (start, config.frame_warmup) if warming else (max(start, config.frame_warmup),
                                                                            config.iterations)
                if rank == 0 and warming not in speed_said and iteration - began >= min(3 * config.log_every,
                                                                                        ends - began):
                    speed_said.add(warming)
                    what = "frame warm-up iterations (then slower video ones)" if warming else "iterations"
                    tqdm.write(describe_speed(last["it_per_s"], ends - iteration, what))
            with meter.paused():  # it/s measures training, not sample and checkpoint writing
                # A first grid within minutes, whatever --sample-every says, and one when a signal stops the run.
                early = sampled_at is None and log_now and time.perf_counter() - t_start > FIRST_SAMPLE_AFTER_S
                if iteration % config.sample_every == 0 or iteration == config.iterations or early or stopping:
                    run.sample(iteration)
                    sampled_at = iteration
                if config.eval_every and (iteration % config.eval_every == 0 or iteration == config.iterations):
                    run.evaluate(iteration)
                if config.snapshot_every and iteration % config.snapshot_every == 0:
                    run.snapshot(iteration)
                if iteration % config.checkpoint_every == 0 or iteration == config.iterations or stopping:
                    run.checkpoint(iteration)
            if stopping:
                if rank == 0:
                    tqdm.write(f"{stop.signal_name or 'signal on another rank'}: stopped after iteration {iteration}; "
                               f"checkpoint written to {checkpoint_path} (continue with --resume)", file=sys.stderr)
                break
    bar.close()
    close_distributed()
    return last


def longer_than_quick_start(parser: argparse.ArgumentParser, config: TrainConfig, quick_start: str,
                            start: int = 0) -> bool:
    """Whether ``config``, from iteration ``start`` on (a resumed run's), trains on more clips (iterations x batch)
    than the ``quick_start`` command (``python SCRIPT FLAGS...``, parsed by ``parser``) does; False without one."""
    if not quick_start:
        return False
    quick = parser.parse_args(shlex.split(quick_start)[2:])
    return (config.iterations - start) * config.batch_size > quick.iterations * quick.batch_size


def main(parser: argparse.ArgumentParser, open_dataset: Callable, gen_samples: Callable, argv=None,
         quick_start: str = "") -> dict:
    """Parse flags into a :class:`TrainConfig`, open the dataset with ``open_dataset(config) -> (dataset,
    description)`` and train.

    ``parser`` comes from :func:`build_parser` (plus the script's own flags); ``quick_start`` is the
    command a run without a GPU recommends when it has more left to train than that command.  Bad input (a missing
    file, a malformed array, a bad flag value) exits with a one-line error.
    """
    config, training = None, False
    try:
        config = parse_config(parser, argv)
        prepare_output_folder(config.out)
        ckpt = resolve_resume(config)  # first: the checkpoint's settings decide how the data is opened
        check_clip_geometry(config)
        check_warp_settings(config)
        start = int(ckpt["iteration"]) if ckpt is not None else 0
        quick_start = quick_start if longer_than_quick_start(parser, config, quick_start, start) else ""
        dataset, describe = open_dataset(config)
        training = True
        return train(config, dataset, gen_samples, describe, ckpt, quick_start)
    except (ValueError, TrainingDiverged, CheckpointError) as err:
        raise SystemExit(report_error(parser.prog, err))
    except OSError as err:  # a missing input before training; mid-run, a full, read-only or removed disk
        if isinstance(err, FileNotFoundError) and not training:
            raise SystemExit(report_error(parser.prog, err))
        out = Path(config.out if config is not None else parser.get_default("out"))
        raise SystemExit(report_error(parser.prog, f"{describe_os_error(err)}; "
                                                   f"{last_good_checkpoint(out / 'checkpoint.pt')}"))
