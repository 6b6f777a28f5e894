"""Sample videos from a trained TGANv2 generator: a training checkpoint or a G-only snapshot.

    python generate.py --checkpoint runs/movingmnist/checkpoint.pt --n 16 --frames 32 --out samples/
    python generate.py --checkpoint runs/movingmnist/snapshots/snapshot_004000.pt --out samples/

writes ``samples/video_0000.gif`` ... ``video_0015.gif`` and ``samples/grid.gif``.  Generation is
dense (every frame of every sample, BatchNorm running statistics) at the chosen level; asking for
more frames than the model was trained on just unrolls the ConvLSTM further.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from models import generated_batches, load_generator, sample_classes
from utils import (InputError, OneLineArgumentParser, add_sampling_arguments, make_grid, pick_device,
                   positive_float, positive_int, prepare_output_folder, report_error, sampling_overrides, to_uint8,
                   write_video)

FORMATS = ("gif", "mp4", "png", "npy")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="generate.py",
        description="Write videos sampled from a TGANv2 generator checkpoint or snapshot, one file each plus a grid.",
        epilog="Errors (a missing checkpoint, a bad value) are one line: 'generate.py: error: ...', exit status 1 "
               "(2 for a malformed flag).")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="training checkpoint (OUT/checkpoint.pt) or G-only snapshot "
                             "(OUT/snapshots/snapshot_XXXXXX.pt)")
    parser.add_argument("--n", type=positive_int, default=16, help="number of videos (default 16)")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="frames per video (default: the training length); longer works")
    parser.add_argument("--level", type=positive_int, default=None,
                        help="level to render, 1 (coarsest) .. L (default L, full resolution)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents z (default 0)")
    add_sampling_arguments(parser)
    parser.add_argument("--class", dest="class_", metavar="NAME|ID",
                        help="conditional checkpoints: generate this class (a name of the checkpoint's class list, "
                             "or its 0-based index); default: uniformly drawn classes")
    parser.add_argument("--format", choices=FORMATS, default="gif",
                        help="gif/mp4 animations, png (frames side by side) or npy (uint8 (T, H, W, C)); default gif")
    parser.add_argument("--out", default="samples", metavar="DIR", help="output folder (default samples/)")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                        help="also write grid.<format> tiling the first --grid-n videos (default on)")
    parser.add_argument("--grid-n", type=positive_int, default=64, help="videos in the grid (default 64)")
    parser.add_argument("--nrow", type=positive_int, default=None,
                        help="videos per grid row (default ceil(sqrt(grid size)))")
    parser.add_argument("--fps", type=positive_float, default=8.0, help="frames per second of gif/mp4 (default 8)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="videos generated per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    return parser


def resolve_class(spec: Optional[str], classes: Optional[Sequence[str]]) -> Optional[int]:
    """``--class NAME|ID`` -> a 0-based class index of the checkpoint's class list (case-insensitive names)."""
    if spec is None:
        return None
    if not classes:
        raise InputError(f"--class {spec}: the checkpoint is unconditional (trained without --conditional)")
    if spec.isdigit():
        if int(spec) >= len(classes):
            raise InputError(f"--class {spec}: class ids are 0..{len(classes) - 1}")
        return int(spec)
    lowered = [c.lower() for c in classes]
    if spec.lower() not in lowered:
        raise InputError(f"--class {spec}: not a class of this checkpoint (e.g. {', '.join(classes[:5])}, ...)")
    return lowered.index(spec.lower())


@torch.no_grad()
def sample(gen: torch.nn.Module, n: int, n_frames: int, level: Optional[int], seed: int,
           batch_size: int = 32, class_id: Optional[int] = None) -> Iterator[torch.Tensor]:
    """``n`` dense samples in batches ``(B, C, n_frames, H, W)`` in ``[-1, 1]``, on the CPU.

    The latents (and, for a conditional model without ``class_id``, the classes) come from a private
    generator seeded with ``seed``, so a seed names a set of videos.
    """
    device = next(gen.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    labels = sample_classes(gen, n, rng, class_id)
    for videos in generated_batches(gen, n, batch_size, n_frames, level, rng, labels):
        yield videos.cpu()


def save_one(frames: np.ndarray, path: Path, fps: float) -> None:
    """uint8 frames ``(T, H, W, C)`` to ``path`` (``.npy`` as the raw array, else :func:`utils.write_video`)."""
    if path.suffix == ".npy":
        np.save(path, frames)
    else:
        write_video(path, frames, fps)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = pick_device(args.device)
        gen, ckpt = load_generator(args.checkpoint, device, **sampling_overrides(args))
        if args.level is not None and args.level > gen.n_levels:
            raise InputError(f"--level {args.level}: the generator has levels 1..{gen.n_levels}")
        classes = ckpt.get("config", {}).get("classes")
        class_id = resolve_class(args.class_, classes)
        out = prepare_output_folder(args.out)
        written = write_samples(args, gen, class_id, classes, out)
    except (InputError, OSError) as err:  # bad input, or a full or read-only disk while writing
        return report_error("generate.py", err)
    print(f"wrote {written} to {out} (iteration {ckpt.get('iteration', '?')} of {args.checkpoint})")
    return 0


def write_samples(args: argparse.Namespace, gen: torch.nn.Module, class_id: Optional[int],
                  classes: Optional[Sequence[str]], out: Path) -> str:
    """Write the videos and the grid ``args`` asks for into ``out``; returns what was written, in words."""
    n_frames = args.frames or gen.cfg.n_frames
    grid_videos = []
    index = 0
    for videos in sample(gen, args.n, n_frames, args.level, args.seed, args.batch_size, class_id):
        for frames in to_uint8(videos):
            save_one(frames, out / f"video_{index:04d}.{args.format}", args.fps)
            index += 1
        if args.grid:
            grid_videos.append(videos[: max(0, args.grid_n - sum(len(v) for v in grid_videos))])
    written = f"{index} videos ({n_frames} frames, {tuple(videos.shape[-2:])} px, level {args.level or gen.n_levels}"
    written += f", class {classes[class_id]})" if class_id is not None else ")"
    if args.grid:
        grid = torch.cat(grid_videos)
        nrow = args.nrow or math.ceil(math.sqrt(len(grid)))
        save_one(make_grid(grid, nrow), out / f"grid.{args.format}", args.fps)
        written += f" and grid.{args.format}"
    return written


if __name__ == "__main__":
    sys.exit(main())
