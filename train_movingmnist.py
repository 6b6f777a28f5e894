"""Train TGANv2 on Moving MNIST (64x64, one channel, 16 frames).

    python train_movingmnist.py                       # real data if available, else procedural digits
    python train_movingmnist.py --data path/to/mnist_test_seq.npy --out runs/mm
"""

from pathlib import Path

import torch

import trainer
from datasets import MovingMNIST, open_moving_mnist
from models import PRESETS, model_config
from utils import save_video_grid

DEFAULTS = dict(
    preset="movingmnist",
    data="auto",
    out="runs/movingmnist",
    iterations=10000,
    batch_size=32,
    lr_decay_start=-1,
    subsample_frames=[2, 2, 2],
    subsample_batch=[1, 1, 1],
    sample_every=500,
    checkpoint_every=1000,
    snapshot_every=1000,
    workers=2,
    sample_grid=8,
    eval_metric="digits",
    eval_samples=512,
)

DESCRIPTION = __doc__ + """
--data: 'auto' uses data/mnist_test_seq.npy, else tries to download it, else falls back to procedural
moving digits with a warning; 'synthetic' always uses procedural digits; a PATH must be a valid
mnist_test_seq.npy (uint8, (frames, videos, 64, 64)) or the run stops with an error. The saved config
records what 'auto' found, and --resume with --data left at 'auto' keeps that data.
"""


def genSamples(gen, z, iteration, out_dir, labels=None, n_frames=16):
    """Write ``OUT/samples/iter_XXXXXX.gif``: a grid of dense samples of the last level.

    ``gen`` is in eval mode (BatchNorm running statistics); ``z`` is the fixed ``(n*n, z_dim)``
    latent batch (``--sample-grid n``), so grids of different iterations show the same videos evolving;
    ``n_frames`` is the run's ``--n-frames``.
    ``labels`` is always ``None`` here: Moving MNIST clips have no class.
    """
    videos = torch.cat([gen.generate(chunk, n_frames) for chunk in z.split(16)])  # (n*n, 1, T, 64, 64)
    nrow = round(len(z) ** 0.5)
    return save_video_grid(videos, Path(out_dir) / "samples" / f"iter_{iteration:06d}.gif", nrow=nrow)


def open_dataset(config):
    """The clips of ``--data`` and a description.  ``auto`` becomes what it found (``synthetic`` or the file's path)
    in ``config``, so the saved config names the data and ``--resume`` keeps it instead of resolving ``auto`` again."""
    dataset = open_moving_mnist(config.data, config.n_frames)
    if config.data == "auto":
        config.data = str(dataset.path) if isinstance(dataset, MovingMNIST) else "synthetic"
    return dataset, f"{type(dataset).__name__}: {getattr(dataset, 'path', 'procedural')}"


# What a run without a GPU recommends: still frames within minutes, moving ones after 22 to 46, 28 to 58 in all (README).
CPU_QUICK_START = ("python train_movingmnist.py --batch-size 8 --iterations 7850 --sample-every 500 --sample-grid 4 "
                   "--out runs/quickstart")


def build_parser():
    """The training flags that apply to Moving MNIST: no class labels, no UCF-101 metrics, 64-px one-channel presets."""
    presets = [name for name, cfg in ((n, model_config(n)) for n in PRESETS)
               if cfg.out_channels == 1 and cfg.resolutions[-1] == 64]
    return trainer.build_parser(DESCRIPTION, DEFAULTS, prog="train_movingmnist.py", presets=presets,
                                conditional=False, video_metrics=False)


def main(argv=None):
    return trainer.main(build_parser(), open_dataset, genSamples, argv, quick_start=CPU_QUICK_START)


if __name__ == "__main__":
    main()
