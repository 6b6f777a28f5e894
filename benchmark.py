"""Measurements, one subcommand each.

    python benchmark.py costs --preset paper --batch-size 8     # the paper's cost table for our code
    python benchmark.py speed --preset movingmnist --device cuda --amp bf16 --compile

    python benchmark.py make-videos /tmp/ucfsyn                 # a UCF-101-shaped tree of synthetic 320x240 videos
    python benchmark.py data --data /tmp/ucfsyn/UCF-101 --resolution 192 --workers 0 2 --batches 20
    python train_ucf101.py prepare --data /tmp/ucfsyn/UCF-101 --cache /tmp/ucfsyn/cache192
    python benchmark.py data --data /tmp/ucfsyn/UCF-101 --cache /tmp/ucfsyn/cache192 --workers 0 2

Each subcommand is an ``add_<name>_parser(subparsers)`` that registers a ``run_<name>(args)``.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import platform
import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torch.utils.flop_counter import flop_registry

from datasets import ResumableBatchSampler, open_video_dataset
from models import PRESETS, build_models, count_parameters, level_labels, model_config
from trainer import TrainConfig, Trainer
from utils import OneLineArgumentParser, encode_video, int_list, pick_device, report_error

# ---------------------------------------------------------------------------------------------
# Synthetic UCF-101-shaped trees (for the data benchmark and the tests)
# ---------------------------------------------------------------------------------------------


def write_video_file(path, frames: np.ndarray, fps: float = 25.0, codec: str = "mpeg4", gop: int = 12,
                     bit_rate: int = 600_000, b_frames: int = 0) -> Path:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` like a UCF-101 file; the container follows the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video(path, frames, fps, codec, bit_rate=bit_rate, gop_size=gop, max_b_frames=b_frames)


def synthetic_frames(rng: np.random.Generator, n_frames: int, height: int, width: int) -> np.ndarray:
    """A camera panning over smooth random texture with a moving square and sensor noise: uint8 ``(T, H, W, 3)``.

    Real-video-like content, so encoded sizes and decoding costs resemble UCF-101's.
    """
    pan = rng.uniform(-2, 2, size=2)
    margin = int(np.ceil(np.abs(pan).max() * n_frames)) + 1
    coarse = rng.uniform(0, 255, size=((height + 2 * margin) // 8 + 2, (width + 2 * margin) // 8 + 2, 3))
    texture = np.kron(coarse, np.ones((8, 8, 1)))  # blocky texture, smoothed below
    for axis in (0, 1):
        texture = (texture + np.roll(texture, 4, axis) + np.roll(texture, -4, axis)) / 3
    side = max(4, height // 5)
    pos, vel = rng.uniform(0, [height - side, width - side]), rng.uniform(-4, 4, size=2)
    out = np.empty((n_frames, height, width, 3), np.uint8)
    for t in range(n_frames):
        y0, x0 = (margin + pan * t).astype(int)
        frame = texture[y0 : y0 + height, x0 : x0 + width].copy()
        y, x = pos.astype(int)
        frame[y : y + side, x : x + side] = (255, 230, 40)
        frame += rng.normal(0, 3, frame.shape)
        out[t] = np.clip(frame, 0, 255)
        pos = np.clip(pos + vel, 0, [height - side, width - side])
    return out


def write_synthetic_ucf101(root, classes: Sequence[str], groups: int = 2, clips: int = 2, n_frames: int = 175,
                           height: int = 240, width: int = 320, fps: float = 25.0, seed: int = 0, **encode) -> List[str]:
    """Write ``ROOT/<Class>/v_<Class>_gXX_cYY.avi`` and ``ROOT/../ucfTrainTestlist/`` like the UCF-101 release.

    Fold ``f`` tests on the ``f``-th third of the groups (UCF-101: groups 1-7, 8-14, 15-21 of 25) and
    trains on the rest; use at least 3 groups.  ``encode`` goes to :func:`write_video_file`.
    Returns the videos' paths relative to ``ROOT``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = []
    for name in classes:
        for g in range(1, groups + 1):
            for c in range(1, clips + 1):
                rel = f"{name}/v_{name}_g{g:02d}_c{c:02d}.avi"
                write_video_file(root / rel, synthetic_frames(rng, n_frames, height, width), fps, **encode)
                paths.append(rel)
    lists = root.parent / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    number = {name: i + 1 for i, name in enumerate(classes)}
    (lists / "classInd.txt").write_text("".join(f"{number[n]} {n}\r\n" for n in classes))  # CRLF as released
    for fold in (1, 2, 3):
        test_groups = set(range(1 + (fold - 1) * groups // 3, 1 + fold * groups // 3))
        test = [p for p in paths if int(p.split("_g")[-1][:2]) in test_groups]
        train = [p for p in paths if p not in test]
        (lists / f"trainlist{fold:02d}.txt").write_text("".join(f"{p} {number[p.split('/')[0]]}\r\n" for p in train))
        (lists / f"testlist{fold:02d}.txt").write_text("".join(f"{p}\r\n" for p in test))
    return paths


def add_make_videos_parser(subparsers) -> None:
    p = subparsers.add_parser("make-videos", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="write a UCF-101-shaped tree of synthetic videos",
                              description="Write OUT/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and OUT/ucfTrainTestlist/ "
                                          "with synthetic videos of UCF-101's format (XviD-like MPEG-4 in AVI).")
    p.add_argument("out", help="folder to write UCF-101/ and ucfTrainTestlist/ into")
    p.add_argument("--classes", type=int, default=5, help="number of classes")
    p.add_argument("--groups", type=int, default=3, help="groups per class (gXX; UCF-101 has 25)")
    p.add_argument("--clips", type=int, default=2, help="clips per group (cYY; UCF-101 has 4 to 7)")
    p.add_argument("--seconds", type=float, default=7.0, help="length of every video (UCF-101 averages 7.2 s)")
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT (UCF-101: 320x240)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate (UCF-101: 25)")
    p.add_argument("--gop", type=int, default=12, help="keyframe interval in frames (longer = costlier seeking)")
    p.add_argument("--bit-rate", type=int, default=600_000, help="bits per second (UCF-101 averages about 550k)")
    p.set_defaults(func=run_make_videos)


def run_make_videos(args) -> dict:
    width, height = (int(v) for v in args.size.lower().split("x"))
    classes = [f"Class{i:03d}" for i in range(1, args.classes + 1)]
    t0 = time.perf_counter()
    paths = write_synthetic_ucf101(Path(args.out) / "UCF-101", classes, args.groups, args.clips,
                                   round(args.seconds * args.fps), height, width, args.fps,
                                   gop=args.gop, bit_rate=args.bit_rate)
    size = sum(f.stat().st_size for f in (Path(args.out) / "UCF-101").rglob("*.avi"))
    print(f"wrote {len(paths)} videos ({size / 2**20:.1f} MiB) to {Path(args.out) / 'UCF-101'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return {"videos": len(paths), "bytes": size}


# ---------------------------------------------------------------------------------------------
# data: clips per second of the UCF-101 / video-folder loader
# ---------------------------------------------------------------------------------------------


def measure_loader(dataset, batch_size: int, workers: int, batches: int, seed: int = 0) -> dict:
    """Clips per second of a training-style DataLoader over ``batches`` batches, after one warm-up batch."""
    loader = DataLoader(dataset, batch_sampler=ResumableBatchSampler(len(dataset), batch_size, seed),
                        num_workers=workers)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # worker start-up and first file opens are not the steady state
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t1
    del it  # shuts the workers down
    return {"workers": workers, "batches": batches, "batch_size": batch_size,
            "clips_per_s": batches * batch_size / elapsed, "first_batch_s": t1 - t0}


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="clips/s of the video loader (decoding and the frame cache)",
                              description="Clips per second delivered by the training DataLoader for each "
                                          "--workers value, decoding with PyAV and, with --cache, from the frame cache.")
    p.add_argument("--data", required=True, help="UCF-101 root or a folder of videos (as train_ucf101.py --data)")
    p.add_argument("--cache", metavar="DIR", help="also measure this frame cache (train_ucf101.py prepare)")
    p.add_argument("--dataset", choices=["auto", "ucf101", "folder"], default="auto", help="as in train_ucf101.py")
    p.add_argument("--fold", type=int, choices=[1, 2, 3], default=1, help="UCF-101 split number")
    p.add_argument("--split", choices=["train", "test", "all"], default="train", help="which list of the fold")
    p.add_argument("--splits", metavar="DIR", help="folder of the UCF-101 split lists")
    p.add_argument("--resolution", type=int, default=192, help="output frame size R (frames resized to R x 4R/3)")
    p.add_argument("--n-frames", type=int, default=16, help="frames per clip")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (after one warm-up batch)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON list instead of a table")
    p.set_defaults(func=run_data)


def run_data(args) -> List[dict]:
    results = []
    for source in ["decode"] + (["cache"] if args.cache else []):
        dataset = open_video_dataset(args.data, args.dataset, args.fold, args.split, args.splits, args.n_frames,
                                     args.resolution, args.cache if source == "cache" else None)
        for workers in args.workers:
            record = measure_loader(dataset, args.batch_size, workers, args.batches)
            record.update(source=source, resolution=args.resolution, videos=len(dataset))
            results.append(record)
            if not args.json:
                print(f"{source:6s} {args.resolution} px  workers {workers}: {record['clips_per_s']:7.1f} clips/s "
                      f"({len(dataset)} videos, batch {args.batch_size}, {args.batches} batches)", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return results


# ---------------------------------------------------------------------------------------------
# costs: the paper's cost table for our code (docs/METHOD.md, 'Cost table'), on the meta device
# ---------------------------------------------------------------------------------------------

# figure/gflops.tsv of the authors' repository, batch 8, paper preset (G cells are multiply-accumulates).
PAPER_GFLOPS = {
    "G": {"naive": [192.41, 35.61, 36.18, 96.37], "frame": [192.41, 17.80, 9.05, 12.05],
          "proposed": [192.41, 8.90, 2.26, 1.51]},
    "D": {"naive": [36.09, 144.34, 577.37, 2309.48], "proposed": [36.09, 36.09, 43.05, 59.76]},
}
PAPER_MEMORY_GB = {"G": {"naive": 7.716, "proposed": 1.091}, "D": {"naive": 15.689, "proposed": 0.771}}
MODES = ("naive", "frame", "batch", "proposed")


def mode_strides(mode: str, n_levels: int, frame_stride: int = 2, batch_stride: int = 2):
    """``(subsample_frames, subsample_batch)`` of a cost-table mode."""
    f = frame_stride if mode in ("frame", "proposed") else 1
    b = batch_stride if mode in ("batch", "proposed") else 1
    return [f] * (n_levels - 1), [b] * (n_levels - 1)


def generator_level_of(module_name: str) -> int:
    """0-based level of a generator submodule: fc, ConvLSTM, base blocks and render head 0 are level 0."""
    parts = module_name.split(".")
    if parts[0] in ("level_blocks", "renders") and len(parts) > 1:
        return int(parts[1]) + (parts[0] == "level_blocks")
    return 0


def discriminator_level_of(module_name: str):
    """0-based level of a discriminator submodule (``levels.k...``), None for the container."""
    parts = module_name.split(".")
    return int(parts[1]) if parts[0] == "levels" and len(parts) > 1 else None


class LevelCounter(TorchDispatchMode):
    """Counts FLOPs (``torch.utils.flop_counter.flop_registry``) and bytes saved for backward per level.

    ``current`` is set by module pre-hooks, so every op is charged to the level whose module runs it.
    A plain dispatch mode (not ``FlopCounterMode``) so it also works around ``autograd.grad``.
    """

    def __init__(self, n_levels: int):
        super().__init__()
        self.current = 0
        self.flops = [0] * n_levels
        self.saved_bytes = [0] * n_levels
        self._seen_storages = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops[self.current] += flop_registry[packet](*args, **kwargs, out_val=out)
        return out

    def pack(self, tensor):
        """``saved_tensors_hooks`` pack hook: charge each saved storage once, parameters never."""
        if not isinstance(tensor, nn.Parameter):
            key = StorageWeakRef(tensor.untyped_storage()).cdata
            if key not in self._seen_storages:
                self._seen_storages.add(key)
                self.saved_bytes[self.current] += tensor.untyped_storage().nbytes()
        return tensor

    def track(self, module: nn.Module, level_of) -> list:
        """Register pre-hooks on ``module``'s submodules setting ``current`` to ``level_of(name)``."""
        handles = []
        for name, child in module.named_modules():
            level = level_of(name) if name else None
            if level is not None:
                handles.append(child.register_forward_pre_hook(lambda m, a, level=level: setattr(self, "current", level)))
        return handles


def measure_costs(preset: str = "paper", batch_size: int = 8, n_frames: int = 16, frame_stride: int = 2,
                  batch_stride: int = 2, n_classes: int = 0) -> dict:
    """Per-level forward GFLOPs and activation bytes of G and D in every mode, plus parameter counts.

    Built on the meta device: nothing is allocated or computed, so any preset runs anywhere.
    D is measured on the generator's renders of the same mode (all four levels).  ``n_classes > 0``
    measures the class-conditional model (categorical BatchNorm, projection discriminators).
    """
    cfg = model_config(preset, n_frames=n_frames, n_classes=n_classes)
    with torch.device("meta"):
        gen, dis = build_models(cfg)
    n_levels = cfg.n_levels
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta") if n_classes else None
    result = {"preset": preset, "batch_size": batch_size, "n_frames": n_frames, "n_classes": n_classes,
              "params": {"G": count_parameters(gen), "D": count_parameters(dis)},
              "gflops": {"G": {}, "D": {}}, "activation_bytes": {"G": {}, "D": {}}}
    for mode in MODES:
        frames, batch = mode_strides(mode, n_levels, frame_stride, batch_stride)
        z = torch.empty(batch_size, cfg.z_dim, device="meta", requires_grad=False)
        counter = LevelCounter(n_levels)
        handles = counter.track(gen, generator_level_of)
        with counter, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            renders = gen(z, n_frames, frames, batch, labels=labels)
        for h in handles:
            h.remove()
        result["gflops"]["G"][mode] = [f / 1e9 for f in counter.flops]
        result["activation_bytes"]["G"][mode] = counter.saved_bytes
        counter = LevelCounter(n_levels)
        handles = counter.track(dis, discriminator_level_of)
        renders = [r.detach().requires_grad_(True) for r in renders]
        with counter, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            dis(renders, level_labels(labels, batch))
        for h in handles:
            h.remove()
        result["gflops"]["D"][mode] = [f / 1e9 for f in counter.flops]
        result["activation_bytes"]["D"][mode] = counter.saved_bytes
    # The paper ran (and counted) the ConvLSTM convolutions on zero input that our code skips.
    t = cfg.t_size
    one_conv = 2 * batch_size * t * t * 4 * cfg.clstm_ch * cfg.clstm_ch * 9 / 1e9
    result["skipped_clstm_gflops"] = one_conv * n_frames  # (T - 1) input convs + the step-0 state conv
    return result


def paper_agreement(costs: dict) -> dict:
    """How our per-level GFLOPs compare with the paper's table.

    G: ours / (2 x paper MACs), with the skipped ConvLSTM convolutions added back to L1.
    D: ours / paper, and the spread of that ratio around its median (one constant factor).
    """
    g_ratio, d_ratio = {}, {}
    for mode, paper in PAPER_GFLOPS["G"].items():
        ours = list(costs["gflops"]["G"][mode])
        ours[0] += costs["skipped_clstm_gflops"]
        g_ratio[mode] = [o / (2 * p) for o, p in zip(ours, paper)]
    for mode, paper in PAPER_GFLOPS["D"].items():
        d_ratio[mode] = [o / p for o, p in zip(costs["gflops"]["D"][mode], paper)]
    factor = float(np.median([r for rs in d_ratio.values() for r in rs]))
    return {"G_ratio": g_ratio, "D_ratio": d_ratio, "D_factor": factor,
            "D_spread": max(abs(r / factor - 1) for rs in d_ratio.values() for r in rs)}


# ---------------------------------------------------------------------------------------------
# speed: seconds per training iteration, achieved TFLOP/s, peak memory
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = None, reps: int = 10) -> float:
    """Measured dense matmul throughput of ``device`` in ``dtype`` (the roofline we compare against)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def step_flops(cfg, config: TrainConfig, batch_size: int) -> int:
    """FLOPs of one whole training step (forward, backward, R1 double backward), counted on meta."""
    meta = torch.device("meta")
    trainer = Trainer(cfg, dataclasses.replace(config, compile=False, amp="none"), meta)
    x = torch.empty(batch_size, cfg.out_channels, cfg.n_frames, cfg.resolutions[-1], cfg.resolutions[-1], device=meta)
    counter = LevelCounter(1)
    with counter:
        trainer.step(x)
    return counter.flops[0]


def measure_speed(preset: str = "movingmnist", batch_size: int = 8, device: str = "auto", amp: str = "none",
                  compile: bool = False, channels_last: bool = False, steps: int = 10, warmup: int = 3,
                  subsample_frames=None, subsample_batch=None, motion_warp: bool = False) -> dict:
    """Time ``steps`` training iterations (``Trainer.step``) on random clips after ``warmup`` untimed ones.

    Strides of 1 (``subsample_frames=[1, 1, 1]``) measure naive dense training; ``motion_warp`` times the
    generator of the default recipe (docs/METHOD.md, 'Motion warp') and its frame discriminator instead of the
    preset's generator.
    """
    device = pick_device(device)
    cfg = model_config(preset, subsample_frames=subsample_frames, subsample_batch=subsample_batch,
                       motion_warp=motion_warp)
    # Video iterations only: the frame warm-up's cheap still-frame iterations are not the steady state.
    # The default recipe's frame discriminator and glyph average (left to the recipe) come with its generator only.
    config = TrainConfig(amp=amp, iterations=steps + warmup, sync_bn=False, compile=compile,
                         channels_last=channels_last, frame_warmup=0, frame_dis_weight=None if motion_warp else 0.0,
                         glyph_average=None if motion_warp else 0.0)
    flops = step_flops(cfg, config, batch_size)
    torch.manual_seed(0)
    trainer = Trainer(cfg, config, device)
    res = cfg.resolutions[-1]
    x = torch.rand(batch_size, cfg.out_channels, cfg.n_frames, res, res, device=device) * 2 - 1
    for _ in range(warmup):
        trainer.step(x)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        losses = trainer.step(x)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    amp = trainer.amp
    peak = matmul_peak_tflops(device, torch.bfloat16 if amp == "bf16" else torch.float32)
    achieved = flops / seconds / 1e12
    return {"preset": preset, "batch_size": batch_size, "device": str(device),
            "subsample_frames": cfg.subsample_frames, "subsample_batch": cfg.subsample_batch, "motion_warp": motion_warp,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "amp": amp, "compile": compile, "channels_last": channels_last,
            "s_per_iter": seconds, "it_per_s": 1 / seconds, "samples_per_s": batch_size / seconds,
            "gflop_per_iter": flops / 1e9, "tflops": achieved, "peak_tflops": peak, "fraction_of_peak": achieved / peak,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "finite": bool(torch.isfinite(torch.stack(list(losses.values()))).all())}


def add_costs_parser(subparsers) -> None:
    p = subparsers.add_parser("costs", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="the paper's cost table for our code (meta device, any machine)",
                              description="Per-level forward GFLOPs (torch.utils.flop_counter, 2 per multiply-add), "
                                          "activation memory (bytes saved for backward) and parameters of G and D in "
                                          "naive, frame-only, batch-only and proposed (frame + batch) subsampling, "
                                          "compared with the authors' figure/gflops.tsv. Runs on the meta device.")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="network sizes")
    p.add_argument("--batch-size", type=int, default=8, help="batch (the paper's table is for 8)")
    p.add_argument("--n-frames", type=int, default=16, help="frames per video")
    p.add_argument("--frame-stride", type=int, default=2, help="frame stride of the frame and proposed modes")
    p.add_argument("--batch-stride", type=int, default=2, help="batch stride of the batch and proposed modes")
    p.add_argument("--conditional", type=int, nargs="?", const=101, default=0, metavar="CLASSES",
                   help="measure the class-conditional model with CLASSES classes (101 = UCF-101 when given alone)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run_costs)


def run_costs(args) -> dict:
    costs = measure_costs(args.preset, args.batch_size, args.n_frames, args.frame_stride, args.batch_stride,
                          args.conditional)
    paper_setting = (args.preset, args.batch_size, args.n_frames, args.frame_stride, args.batch_stride,
                     args.conditional) == ("paper", 8, 16, 2, 2, 0)
    if paper_setting:
        costs["paper_agreement"] = paper_agreement(costs)
    if args.json:
        print(json.dumps(costs, indent=2))
        return costs
    kind = f"conditional ({args.conditional} classes) " if args.conditional else ""
    print(f"{kind}{args.preset} preset, batch {args.batch_size}, {args.n_frames} frames; parameters: "
          f"G {costs['params']['G']:,}, D {costs['params']['D']:,}")
    for net in ("G", "D"):
        naive_flops = sum(costs["gflops"][net]["naive"])
        naive_bytes = sum(costs["activation_bytes"][net]["naive"])
        print(f"\n{net}: GFLOPs per level (forward)          total   less   | activations MiB per level     total  less")
        for mode in MODES:
            flops, act = costs["gflops"][net][mode], costs["activation_bytes"][net][mode]
            print(f"  {mode:9s}" + "".join(f"{f:9.2f}" for f in flops) + f" {sum(flops):9.2f} {naive_flops / sum(flops):5.2f}x |"
                  + "".join(f"{b / 2**20:7.0f}" for b in act) + f" {sum(act) / 2**20:8.0f} {naive_bytes / sum(act):5.2f}x")
    if paper_setting:
        agree = costs["paper_agreement"]
        print("\nagainst the paper (figure/gflops.tsv):")
        for mode, ratios in agree["G_ratio"].items():
            print(f"  G {mode:9s} ours / (2 x paper MACs), L1 with the {costs['skipped_clstm_gflops']:.1f} GFLOPs of "
                  f"skipped zero-input ConvLSTM convs added: " + " ".join(f"{r:.4f}" for r in ratios))
        for mode, ratios in agree["D_ratio"].items():
            print(f"  D {mode:9s} ours / paper: " + " ".join(f"{r:.4f}" for r in ratios))
        print(f"  D factor {agree['D_factor']:.4f} (median), largest deviation {100 * agree['D_spread']:.1f}%")
        for net in ("G", "D"):
            ours = sum(costs["activation_bytes"][net]["naive"]) / sum(costs["activation_bytes"][net]["proposed"])
            theirs = PAPER_MEMORY_GB[net]["naive"] / PAPER_MEMORY_GB[net]["proposed"]
            print(f"  {net} memory naive / proposed: ours {ours:.2f}x (activations), paper {theirs:.2f}x (Chainer, GPU)")
    return costs


def add_speed_parser(subparsers) -> None:
    p = subparsers.add_parser("speed", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              help="seconds per training iteration, achieved TFLOP/s, peak memory",
                              description="Times the whole training step (G forward, D on real and fake, backward "
                                          "passes, R1 double backward, both Adam steps) on random clips and compares "
                                          "its FLOPs per second with the device's measured matmul peak.")
    p.add_argument("--preset", default="movingmnist", choices=sorted(PRESETS), help="network sizes")
    p.add_argument("--batch-size", type=int, default=8, help="clips per iteration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="none", choices=["auto", "none", "bf16"],
                   help="bf16 autocast (auto: on a GPU that supports it, else fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile G and D's fake pass (with --channels-last the trainer refuses it on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels-last layouts")
    p.add_argument("--subsample-frames", type=int_list, help="frame strides (1,1,1 = naive); default: the preset's")
    p.add_argument("--subsample-batch", type=int_list, help="batch strides; default: the preset's")
    p.add_argument("--motion-warp", action="store_true",
                   help="time the generator of train_movingmnist.py's default recipe (one map per clip, moved by "
                        "flow fields) and its frame discriminator instead of the preset's per-frame renderer")
    p.add_argument("--steps", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation, autotuning)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_speed)


def run_speed(args) -> dict:
    result = measure_speed(args.preset, args.batch_size, args.device, args.amp, args.compile, args.channels_last,
                           args.steps, args.warmup, args.subsample_frames, args.subsample_batch, args.motion_warp)
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    memory = result["peak_memory_bytes"]
    print(f"{result['preset']} batch {result['batch_size']} on {result['device']} ({result['device_name']}, "
          f"{result['threads']} threads), amp {result['amp']}, compile {result['compile']}, "
          f"channels-last {result['channels_last']}, strides {result['subsample_frames']}/{result['subsample_batch']}:\n"
          f"  {result['s_per_iter']:.4f} s/iter, {result['samples_per_s']:.1f} samples/s, "
          f"{result['gflop_per_iter']:.1f} GFLOP/iter -> {result['tflops']:.3f} TFLOP/s of a measured "
          f"{result['peak_tflops']:.3f} TFLOP/s matmul peak ({100 * result['fraction_of_peak']:.0f}%)"
          + (f", peak memory {memory / 2**30:.2f} GiB" if memory is not None else ""))
    return result


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = OneLineArgumentParser(prog="benchmark.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_make_videos_parser(subparsers)
    add_data_parser(subparsers)
    add_costs_parser(subparsers)
    add_speed_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input (a missing file, a bad value), or a full or read-only disk
        raise SystemExit(report_error("benchmark.py", err))


if __name__ == "__main__":
    main()
