"""UCF-101 and video folders: the PyAV reader, split lists, pre-processing, the frame cache and train_ucf101.py.

The tests write a tiny UCF-101-shaped tree of real video files (MPEG-4 in AVI with B-frames and short
GOPs, so seeking is exercised), plus one corrupt file and one too-short video listed in trainlist01.
"""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datasets
import models
import train_ucf101
from benchmark import synthetic_frames, write_video_file
from datasets import (UCF101, ResumableBatchSampler, VideoError, VideoFolder, crop_and_flip, decode_video,
                      find_ucf101_splits, open_video_dataset, paper_geometry, probe_video, read_clip, split_key)
from utils import load_checkpoint

from conftest import CLASSES, R, T


@pytest.mark.parametrize("name, codec, b_frames", [("v.avi", "mpeg4", 2), ("v.mp4", "libx264", 3),
                                                    ("v.mkv", "libx264", 3), ("v.webm", "libvpx-vp9", 0)])
def test_video_reader_seeks_to_the_same_frames_as_full_decoding(tmp_path, name, codec, b_frames):
    path = write_video_file(tmp_path / name, synthetic_frames(np.random.default_rng(0), 32, 48, 64), codec=codec,
                            gop=7, b_frames=b_frames)
    info = probe_video(path)
    full = decode_video(path, *paper_geometry(R)[:2])
    assert info.n_frames == 32 and full.shape == (32, 64, 85, 3) and full.dtype == np.uint8
    assert len(info.key_pts) > 2  # several GOPs: clips after the first keyframe really seek
    for start in (0, 3, 7, 8, 16):
        assert datasets._read_clip_seeking(path, start, T, 64, 85, info) is not None  # no fallback taken
        clip = read_clip(path, start, T, 64, 85, info)
        np.testing.assert_array_equal(clip, full[start : start + T])
        np.testing.assert_array_equal(read_clip(path, start, T, 64, 85), clip)  # no index: decodes from the start
    with pytest.raises(VideoError, match="ended before frame 33"):
        read_clip(path, 17, T, 64, 85)


def test_split_lists_labels_and_skipping(tree, capsys):
    train = UCF101(tree, fold=1, split="train", resolution=R, progress=False)
    err = capsys.readouterr().err
    assert train.classes == CLASSES
    assert train.paths == [f"{c}/v_{c}_g0{g}_c01.avi" for c in CLASSES for g in (2, 3)]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    assert [CLASSES[label] for label in train.labels] == [p.split("/")[0] for p in train.paths]
    # one warning line per skipped video, then the count
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert "YoYo/v_YoYo_g02_c02.avi: unreadable" in warnings[0]
    assert "Basketball/v_Basketball_g03_c02.avi: only 8 frames, fewer than 16" in warnings[1]
    assert "skipped 2 of 8 videos" in warnings[2]
    assert sorted(p for p, _ in train.skipped) == ["Basketball/v_Basketball_g03_c02.avi", "YoYo/v_YoYo_g02_c02.avi"]

    test = UCF101(tree, fold=1, split="test", resolution=R, progress=False, return_label=True)
    assert test.paths == [f"{c}/v_{c}_g01_c01.avi" for c in CLASSES]
    clip, label = test[(2, 5)]
    assert label == 2 and clip.shape == (3, T, R, R)
    fold2 = UCF101(tree, fold=2, split="test", resolution=R, progress=False)
    assert fold2.paths == [f"{c}/v_{c}_g02_c01.avi" for c in CLASSES]


def test_split_lists_are_found_in_root_next_to_it_or_with_splits(tmp_path, tree):
    lists = tree.parent / "ucfTrainTestlist"
    assert find_ucf101_splits(tree) == lists  # next to the root
    inside = tmp_path / "UCF-101"
    shutil.copytree(lists, inside / "ucfTrainTestlist")
    assert find_ucf101_splits(inside) == inside / "ucfTrainTestlist"
    assert find_ucf101_splits(tmp_path / "elsewhere", splits_dir=lists) == lists
    with pytest.raises(FileNotFoundError, match="classInd.txt"):
        find_ucf101_splits(tree, splits_dir=tmp_path)


def test_flat_layout(tmp_path, tree):
    flat = tmp_path / "flat"
    flat.mkdir()
    for video in tree.rglob("*.avi"):
        (flat / video.name).symlink_to(video)
    ds = UCF101(flat, split="test", splits_dir=tree.parent / "ucfTrainTestlist", resolution=R, progress=False)
    assert ds.paths == [f"v_{c}_g01_c01.avi" for c in CLASSES]
    np.testing.assert_array_equal(ds.labels, [0, 1, 2])


def test_clip_shape_range_crop_and_flip(tree):
    ds = UCF101(tree, split="test", resolution=R, progress=False)
    height, width, margin = paper_geometry(R)
    lefts, flips = set(), set()
    for seed in range(300):
        index, rng = split_key((seed % len(ds), seed))
        start, left, flip = ds.sample_params(index, rng)
        assert 0 <= start <= 24 - T and margin <= left <= width - R - margin
        lefts.add(left)
        flips.add(flip)
    assert min(lefts) == margin and max(lefts) == width - R - margin and flips == {False, True}

    for key in [(0, 11), (1, 12), (2, 13), (0, 14)]:
        clip = ds[key]
        assert clip.dtype == torch.uint8 and clip.shape == (3, T, R, R)  # the trainer maps it to [-1, 1]
        torch.testing.assert_close(ds[key], clip, rtol=0, atol=0)  # a key always gives the same clip
        index, rng = split_key(key)
        start, left, flip = ds.sample_params(index, rng)
        expected = crop_and_flip(ds.frames(index, start), left, R, flip)
        torch.testing.assert_close(clip, expected, rtol=0, atol=0)


def test_crop_and_flip_take_the_right_columns_on_real_frames(tmp_path):
    # a horizontal ramp survives encoding and resizing as a rising column profile
    ramp = np.broadcast_to(np.linspace(0, 255, 128, dtype=np.float32)[None, None, :, None], (20, 96, 128, 3))
    write_video_file(tmp_path / "ramp" / "ramp.mp4", ramp.astype(np.uint8), codec="libx264")
    ds = VideoFolder(tmp_path / "ramp", resolution=R, progress=False)
    assert ds.classes == ["."] and list(ds.labels) == [0]
    seen = set()
    for seed in range(12):
        index, rng = split_key((0, seed))
        start, left, flip = ds.sample_params(index, rng)
        profile = ds.frames(index, start).astype(np.float64).mean(axis=(0, 1, 3))  # (85,) mean of each column
        assert (np.diff(profile) > 0).all()
        clip_profile = ds[(0, seed)].double().mean(dim=(0, 1, 2)).numpy()
        window = profile[left : left + R]
        np.testing.assert_allclose(clip_profile, window[::-1] if flip else window, atol=1e-6)
        seen.add(flip)
    assert seen == {False, True}


def test_video_folder_of_mixed_containers(tmp_path):
    rng = np.random.default_rng(0)
    write_video_file(tmp_path / "a" / "one.mp4", synthetic_frames(rng, 20, 48, 64), codec="libx264")
    write_video_file(tmp_path / "a" / "two.mkv", synthetic_frames(rng, 20, 48, 64), codec="libx264")
    write_video_file(tmp_path / "b" / "deep" / "three.webm", synthetic_frames(rng, 18, 48, 64), codec="libvpx-vp9")
    (tmp_path / "b" / "notes.txt").write_text("not a video")
    ds = open_video_dataset(tmp_path, resolution=R)
    assert type(ds) is VideoFolder
    assert ds.paths == ["a/one.mp4", "a/two.mkv", "b/deep/three.webm"]
    assert ds.classes == ["a", "b/deep"] and list(ds.labels) == [0, 0, 1]
    assert list(ds.frame_counts) == [20, 20, 18]
    assert ds[(2, 3)].shape == (3, T, R, R)


def test_workers_load_the_same_batches(tree):
    ds = UCF101(tree, resolution=R, progress=False)

    def batches(workers):
        loader = DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), 3, seed=1), num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    # 0 workers first: the main process has resized frames before the workers fork (with PyAV 18.1.1 they hung)
    for a, b in zip(batches(0), batches(2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def any_free_space(monkeypatch):
    """The cache tests write a few MiB; the temporary folder may have less than the 1 GiB reserve free."""
    monkeypatch.setattr(datasets, "CACHE_FREE_SPACE_RESERVE", 0)


def test_frame_cache_is_bit_identical_and_resumes(tmp_path, tree, capsys, any_free_space):
    cache = tmp_path / "cache"
    # an interrupted run: only the train list, then garbage after the last indexed video
    train_ucf101.main(["prepare", "--data", str(tree), "--cache", str(cache), "--resolution", str(R),
                       "--split", "train", "--workers", "0"])
    first = json.loads((cache / "index.json").read_text())
    assert "YoYo/v_YoYo_g02_c02.avi" in first["skipped"] and len(first["videos"]) == 7
    with open(cache / "frames.u8", "ab") as f:
        f.write(b"\x01" * 1000)
    train_ucf101.main(["prepare", "--data", str(tree), "--cache", str(cache), "--resolution", str(R), "--workers", "2"])
    index = json.loads((cache / "index.json").read_text())
    assert index["complete"] and len(index["videos"]) == 10
    assert all(index["videos"][p] == v for p, v in first["videos"].items())  # done videos stay where they were
    height, width, _ = paper_geometry(R)
    assert (cache / "frames.u8").stat().st_size == index["total_frames"] * height * width * 3

    capsys.readouterr()
    decoded = UCF101(tree, resolution=R, progress=False)
    err_decoded = capsys.readouterr().err
    cached = UCF101(tree, resolution=R, cache=cache, progress=False)
    assert capsys.readouterr().err == err_decoded  # the same skips, reported the same way
    assert cached.paths == decoded.paths and list(cached.frame_counts) == list(decoded.frame_counts)
    np.testing.assert_array_equal(cached.labels, decoded.labels)
    for seed in range(12):
        key = (seed % len(decoded), 1000 + seed)
        torch.testing.assert_close(cached[key], decoded[key], rtol=0, atol=0)

    with pytest.raises(ValueError, match="prepared with --resolution 64"):
        UCF101(tree, resolution=128, cache=cache, progress=False)


def test_frame_cache_stops_before_the_disk_is_full_and_resumes(tmp_path, tree, capsys, monkeypatch):
    cache = tmp_path / "cache"
    argv = ["prepare", "--data", str(tree), "--cache", str(cache), "--resolution", str(R), "--workers", "0"]
    monkeypatch.setattr(datasets, "CACHE_FREE_SPACE_RESERVE", 1 << 60)
    with pytest.raises(SystemExit) as exit_info:
        train_ucf101.main(argv)
    assert exit_info.value.code == 1
    assert f"--cache {cache}: disk almost full; free space and run prepare again" in capsys.readouterr().err
    index = json.loads((cache / "index.json").read_text())
    assert not index["complete"] and index["videos"] == {} and (cache / "frames.u8").stat().st_size == 0
    monkeypatch.setattr(datasets, "CACHE_FREE_SPACE_RESERVE", 0)
    train_ucf101.main(argv)
    assert json.loads((cache / "index.json").read_text())["complete"]


def test_user_errors_are_clear(tmp_path, tree, capsys):
    lists = tree.parent / "ucfTrainTestlist"
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(lists / "classInd.txt", partial)
    shutil.copy(lists / "trainlist01.txt", partial)
    with pytest.raises(FileNotFoundError, match="trainlist02.txt"):
        UCF101(tree, fold=2, splits_dir=partial, resolution=R, progress=False)
    (partial / "trainlist02.txt").write_text("Juggling/v_Juggling_g01_c01.avi 4\n")
    with pytest.raises(ValueError, match="class 'Juggling'.*not in .*classInd.txt"):
        UCF101(tree, fold=2, splits_dir=partial, resolution=R, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        open_video_dataset(tmp_path / "empty")
    bare = tmp_path / "bare"
    shutil.copytree(tree / "YoYo", bare / "YoYo")
    with pytest.raises(FileNotFoundError, match="looks like UCF-101"):
        open_video_dataset(bare)
    with pytest.raises(SystemExit) as exit_info:
        train_ucf101.main(["--data", str(tree), "--splits", str(partial), "--fold", "3", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    assert "error: " in capsys.readouterr().err and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_paper_preset_defaults():
    args = train_ucf101.trainer.parse_config(train_ucf101.build_parser(), [])
    assert (args.preset, args.batch_size, args.iterations, args.gp_weight) == ("paper", 32, 100000, 0.5)
    assert (args.lr_g, args.lr_d, args.beta1, args.beta2, args.lr_decay_start) == (1e-4, 1e-4, 0.0, 0.9, 0)
    assert (args.subsample_frames, args.subsample_batch, args.n_frames) == ([2, 2, 2], [1, 1, 1], 16)
    cfg = models.model_config("paper", resolution=train_ucf101.DEFAULTS["resolution"])
    assert cfg.resolutions == [24, 48, 96, 192] and cfg.dis_channels[0] == 64 and cfg.out_channels == 3


def test_two_iterations_write_a_gif_and_a_checkpoint(tmp_path, tree, small_rgb_preset):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spinning against other processes on a small CPU can take 10x longer
    try:
        last = train_ucf101.main(["--data", str(tree), "--preset", "test-rgb", "--resolution", str(R), "--batch-size",
                                  "2", "--iterations", "2", "--sample-grid", "1", "--workers", "0", "--device", "cpu",
                                  "--log-every", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(last["loss_d"]) and np.isfinite(last["loss_g"])
    frames = iio.imread(out / "samples" / "iter_000002.gif", index=None)
    assert frames.shape[:3] == (T, R + 2, R + 2)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["resolution"] == R and config["lr_decay_start"] == 0 and config["model"]["out_channels"] == 3
    assert "UCF-101 fold 1 train: 6 videos" in config["data_description"]
