"""generate.py: readable files with the requested frames, levels and formats, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import generate  # noqa: E402
from datasets import read_video, video_paths  # noqa: E402
from models import Generator, model_config  # noqa: E402
from utils import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained Moving MNIST generator checkpoint (64x64, 1 channel, 4 levels)."""
    torch.manual_seed(0)
    cfg = model_config("movingmnist")
    gen = Generator(cfg)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint({"generator": gen.state_dict(), "config": {"model": cfg.to_dict()}, "iteration": 0}, path)
    return path


def run(checkpoint, out, *flags):
    return generate.main(["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", *flags])


def test_gif_videos_and_grid_have_the_requested_frames(checkpoint, tmp_path, capsys):
    import imageio.v3 as iio

    assert run(checkpoint, tmp_path, "--n", "3", "--frames", "20", "--format", "gif") == 0  # longer than trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.gif", "video_0000.gif", "video_0001.gif",
                                                          "video_0002.gif"]
    for i in range(3):
        frames = iio.imread(tmp_path / f"video_{i:04d}.gif", index=None)
        assert frames.shape[:3] == (20, 64, 64)
    grid = iio.imread(tmp_path / "grid.gif", index=None)
    assert grid.shape[:3] == (20, 2 * 65 + 1, 2 * 65 + 1)  # 3 videos on a 2x2 grid, 1-pixel padding
    assert "wrote 3 videos (20 frames" in capsys.readouterr().out


def test_mp4_videos_decode_with_pyav(checkpoint, tmp_path):
    import av

    assert run(checkpoint, tmp_path, "--n", "2", "--frames", "8", "--format", "mp4", "--fps", "4") == 0
    for name in ("video_0000.mp4", "video_0001.mp4", "grid.mp4"):
        with av.open(str(tmp_path / name)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8
    assert frames[0].shape == (65 + 1, 2 * 65 + 1 + 1, 3)  # 1x2 grid; odd sizes padded to even for yuv420p


def test_npy_at_a_lower_level_without_grid_is_seeded(checkpoint, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(checkpoint, a, "--n", "3", "--frames", "4", "--level", "2", "--format", "npy", "--no-grid", "--seed", "1") == 0
    assert run(checkpoint, b, "--n", "3", "--frames", "4", "--level", "2", "--format", "npy", "--no-grid", "--seed", "1",
               "--batch-size", "2") == 0
    assert run(checkpoint, c, "--n", "1", "--frames", "4", "--level", "2", "--format", "npy", "--no-grid", "--seed", "2") == 0
    assert not (a / "grid.npy").exists()
    video = np.load(a / "video_0000.npy")
    assert video.dtype == np.uint8 and video.shape == (4, 16, 16, 1)  # level 2 of 64 px is 16 px
    for i in range(3):
        np.testing.assert_array_equal(np.load(a / f"video_{i:04d}.npy"), np.load(b / f"video_{i:04d}.npy"))
    assert not np.array_equal(video, np.load(c / "video_0000.npy"))


def test_png_strips_and_evaluate_reads_the_folder_back(checkpoint, tmp_path):
    import imageio.v3 as iio

    assert run(checkpoint, tmp_path, "--n", "2", "--frames", "4", "--format", "png", "--nrow", "1") == 0
    strip = iio.imread(tmp_path / "video_0001.png")
    assert strip.shape[:2] == (64, 4 * 64)
    assert iio.imread(tmp_path / "grid.png").shape[:2] == (2 * 65 + 1, 4 * (1 * 65 + 1))
    npy_dir = tmp_path / "npy"
    assert run(checkpoint, npy_dir, "--n", "2", "--format", "npy") == 0
    paths = video_paths(npy_dir)  # the grid is not a sample
    assert [p.name for p in paths] == ["video_0000.npy", "video_0001.npy"]
    assert read_video(paths[0]).shape == (1, 16, 64, 64)


def test_bad_values_give_one_line_errors(checkpoint, tmp_path, capsys):
    assert run(checkpoint, tmp_path / "out", "--level", "5") == 1
    err = capsys.readouterr().err
    assert err == "generate.py: error: --level 5: the generator has levels 1..4\n"
    assert not (tmp_path / "out").exists()


def test_rigid_cells_need_a_motion_warp_checkpoint(checkpoint, tmp_path, capsys):
    assert run(checkpoint, tmp_path / "out", "--rigid-cells", "2") == 1
    err = capsys.readouterr().err
    assert err == f"generate.py: error: {checkpoint}: --rigid-cells 2 needs a motion-warp generator; this one has none\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--level", "0"], "argument --level: expected an integer >= 1, got 0"),
    (["--n", "0"], "argument --n: expected an integer >= 1, got 0"),
    (["--frames", "-3"], "argument --frames: expected an integer >= 1, got -3"),
    (["--fps", "0"], "argument --fps: expected a finite number > 0, got 0"),
    (["--rigid-cells", "-1"], "argument --rigid-cells: expected an integer >= 0, got -1"),
])
def test_out_of_range_flags_are_one_line_usage_errors(checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(checkpoint, tmp_path / "out", *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tmp_path / "none.pt"),
                           "--out", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"generate.py: error: {tmp_path / 'none.pt'}: no such checkpoint"
