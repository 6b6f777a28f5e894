"""Fixtures shared by several test files."""

import numpy as np
import pytest

import models
from benchmark import synthetic_frames, write_synthetic_ucf101, write_video_file

CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]
R = 64  # --resolution of the video tests: frames 64x85, crops 64x64, margin 1
T = 16


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """``TMP/UCF-101/<Class>/v_<Class>_g0G_c01.avi`` (24 frames, 72x96), G = 1..3, lists in ``TMP/ucfTrainTestlist``.

    Fold 1 trains on groups 2-3 plus a corrupt file and an 8-frame video, and tests on group 1.
    """
    base = tmp_path_factory.mktemp("ucf")
    root = base / "UCF-101"
    write_synthetic_ucf101(root, CLASSES, groups=3, clips=1, n_frames=24, height=72, width=96, gop=6, b_frames=2)
    (root / "YoYo" / "v_YoYo_g02_c02.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    write_video_file(root / "Basketball" / "v_Basketball_g03_c02.avi",
                     synthetic_frames(np.random.default_rng(1), 8, 72, 96))
    with open(base / "ucfTrainTestlist" / "trainlist01.txt", "a") as f:
        f.write("YoYo/v_YoYo_g02_c02.avi 3\r\nBasketball/v_Basketball_g03_c02.avi 2\r\n")
    return root


@pytest.fixture
def small_rgb_preset(monkeypatch):
    """``--preset test-rgb``: the paper networks (200 M parameters) take minutes per CPU step, the scripts do not change."""
    monkeypatch.setitem(models.PRESETS, "test-rgb", dict(t_size=4, clstm_ch=32, base_channels=[32],
                                                         level_channels=[16, 16, 16], out_channels=3,
                                                         dis_channels=[8, 8, 16, 16, 32]))
    return "test-rgb"
