"""Train TGANv2 on UCF-101 (or any folder of videos) with the paper's configuration.

    python train_ucf101.py --data UCF-101/ --out runs/ucf101              # the paper's 192x192 model
    python train_ucf101.py --data UCF-101/ --resolution 64 --batch-size 8  # the same recipe at 64 px
    python train_ucf101.py --data FaceForensics/ --dataset folder          # every video under a folder
    python train_ucf101.py prepare --data UCF-101/ --cache /fast/ucf192    # one-time frame cache ...
    python train_ucf101.py --data UCF-101/ --cache /fast/ucf192            # ... then train from it
"""

import argparse
import os
import sys
from pathlib import Path

import torch

import trainer
from datasets import (CACHE_FREE_SPACE_RESERVE, VIDEO_EXTENSIONS, list_ucf101, list_video_folder, open_video_dataset,
                      prepare_frame_cache, video_dataset_kind)
from utils import OneLineArgumentParser, report_error, save_video_grid

# The paper's run (docs/METHOD.md, 'Presets'): the authors' recipe (fp32, Adam 1e-4 (0.0, 0.9); lambda 0.5 from
# trainer.TrainConfig), 192 px, batch 32 per GPU, 100k iterations, learning rates decaying linearly to 0 from
# iteration 0, frame strides 2,2,2.  The tuned recipe was measured on 64-px digits only, so it is opt-in here.
DEFAULTS = dict(
    recipe="paper",
    preset="paper",
    data="UCF-101",
    out="runs/ucf101",
    iterations=100000,
    batch_size=32,
    lr_decay_start=0,
    subsample_frames=[2, 2, 2],
    subsample_batch=[1, 1, 1],
    sample_every=1000,
    checkpoint_every=1000,
    snapshot_every=10000,
    workers=min(8, os.cpu_count() or 1),
    sample_grid=6,
    resolution=192,
    dataset="auto",
    fold=1,
    split="train",
    splits=None,
    cache=None,
)

DESCRIPTION = __doc__ + f"""
--data: the UCF-101 release (UCF-101/<Class>/v_<Class>_gXX_cYY.avi, or all videos in one folder) with
its split lists in UCF-101/ucfTrainTestlist/, next to it, or at --splits; or, with --dataset folder
(or automatically when there are no split lists), every {'/'.join(VIDEO_EXTENSIONS)} file below it.
Frames are resized to R x 4R/3 (192x256), cropped to R x R at a random column 4R/192 px or more from
either edge, flipped at random, 16 consecutive frames from a random start, values in [-1, 1].
Unreadable or too-short videos are skipped with a warning. `prepare` (see `prepare --help`) decodes
every video once into --cache DIR; training with --cache reads those frames, bit-identical to decoding.
"""


def genSamples(gen, z, iteration, out_dir, labels=None, n_frames=16):
    """Write ``OUT/samples/iter_XXXXXX.gif``: a grid of dense 192x192 (``--resolution``) samples.

    ``gen`` is in eval mode (BatchNorm running statistics); ``z`` is the fixed ``(n*n, z_dim)``
    latent batch (``--sample-grid n``), so grids of different iterations show the same videos evolving;
    ``n_frames`` is the run's ``--n-frames``.
    ``labels`` (conditional runs) give one class per row.
    """
    label_chunks = labels.split(8) if labels is not None else [None] * len(z.split(8))
    videos = torch.cat([gen.generate(chunk, n_frames, labels=y) for chunk, y in zip(z.split(8), label_chunks)])
    nrow = round(len(z) ** 0.5)
    return save_video_grid(videos, Path(out_dir) / "samples" / f"iter_{iteration:06d}.gif", nrow=nrow)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags shared by training and ``prepare``."""
    parser.add_argument("--dataset", choices=["auto", "ucf101", "folder"],
                        help="ucf101: use the official split lists; folder: every video under --data; "
                             "auto: ucf101 when split lists are found")
    parser.add_argument("--fold", type=int, choices=[1, 2, 3], help="UCF-101 train/test split number (trainlist0F.txt)")
    parser.add_argument("--split", choices=["train", "test", "all"],
                        help="which list of the fold (all = train and test: every video of UCF-101)")
    parser.add_argument("--splits", metavar="DIR",
                        help="folder of classInd.txt, trainlist0F.txt, testlist0F.txt; "
                             "unset: DATA/ucfTrainTestlist or DATA/../ucfTrainTestlist")
    parser.add_argument("--resolution", type=int, choices=[64, 128, 192],
                        help="output frame size R: frames resized to R x 4R/3, R x R crops, model rescaled to match")


def build_parser() -> argparse.ArgumentParser:
    """Every training flag, plus the data flags of UCF-101 and video folders."""
    parser = trainer.build_parser(DESCRIPTION, DEFAULTS, prog="train_ucf101.py")
    add_data_arguments(parser)
    parser.add_argument("--cache", metavar="DIR",
                        help="read frames from a cache built by `prepare` instead of decoding")
    return parser


def open_dataset(config):
    dataset = open_video_dataset(config.data, config.dataset, config.fold, config.split, config.splits, config.n_frames,
                                 config.resolution, config.cache, return_label=config.conditional)
    return dataset, dataset.describe()


def prepare(argv=None) -> dict:
    """``train_ucf101.py prepare``: decode the videos once into a frame cache (resumable)."""
    parser = OneLineArgumentParser(
        prog="train_ucf101.py prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Decode every video of --data once, resized for --resolution, into --cache DIR "
                    "(DIR/frames.u8, memory-mapped uint8 frames, and DIR/index.json). Interrupted runs resume "
                    "where they stopped; running again with another --split adds its videos. Needs about "
                    "340 GiB for all of UCF-101 at 192 px (150 at 128, 38 at 64), and stops with an error while "
                    f"{CACHE_FREE_SPACE_RESERVE >> 30} GiB of the disk is still free.")
    parser.add_argument("--data", default=DEFAULTS["data"], help="UCF-101 root or a folder of videos")
    parser.add_argument("--cache", required=True, metavar="DIR", help="where the cache is written")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"], help="decoding processes (0 = this one)")
    add_data_arguments(parser)
    parser.set_defaults(dataset="auto", fold=1, split="all", resolution=DEFAULTS["resolution"])
    args = parser.parse_args(argv)
    try:
        if video_dataset_kind(args.data, args.dataset, args.splits) == "ucf101":
            paths = list_ucf101(args.data, args.fold, args.split, args.splits)[0]
        else:
            paths = list_video_folder(args.data)[0]
        index = prepare_frame_cache(args.data, paths, args.cache, args.resolution, args.workers)
    except (ValueError, OSError) as err:
        raise SystemExit(report_error(parser.prog, err))
    except KeyboardInterrupt:
        print(f"interrupted: {args.cache} keeps the videos done so far; run the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    print(f"frame cache {args.cache}: {len(index['videos'])} videos, {index['total_frames']} frames, "
          f"{len(index['skipped'])} unreadable", file=sys.stderr)
    return index


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        return prepare(argv[1:])
    return trainer.main(build_parser(), open_dataset, genSamples, argv)


if __name__ == "__main__":
    main()
