"""Moving MNIST, procedural digits, the sampler, the real pyramid, losses, R1, grids, checkpoints."""

import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import MovingDigits, MovingMNIST, ResumableBatchSampler, open_moving_mnist, to_unit_range
from models import real_pyramid
from utils import (discriminator_loss, generator_loss, load_checkpoint, lower_render_loss, make_grid,
                   previous_checkpoint_path, r1_penalty, save_checkpoint, save_video_grid, write_video)


@pytest.fixture
def mnist_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(20, 5, 64, 64), dtype=np.uint8)
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, data)
    return path, data


def test_moving_mnist_window_and_range(mnist_file):
    path, data = mnist_file
    ds = MovingMNIST(path, n_frames=16)
    assert len(ds) == 5
    starts = set()
    for seed in range(30):
        clip = ds[(3, seed)]
        assert clip.shape == (1, 16, 64, 64) and clip.dtype == torch.uint8  # the trainer maps it to [-1, 1]
        raw = clip[0].numpy()
        start = next(s for s in range(5) if np.array_equal(raw, data[s : s + 16, 3]))
        starts.add(start)
    assert starts == {0, 1, 2, 3, 4}  # every window start reachable, windows are consecutive frames
    torch.testing.assert_close(ds[(1, 7)], ds[(1, 7)])


def test_moving_mnist_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        MovingMNIST(tmp_path / "missing.npy")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((20, 5, 64), np.uint8))
    with pytest.raises(ValueError, match=r"bad.npy: expected a uint8 array"):
        MovingMNIST(bad)
    np.save(bad, np.zeros((10, 5, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="fewer than --n-frames"):
        MovingMNIST(bad)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy: not a readable"):
        MovingMNIST(junk)
    with pytest.raises(FileNotFoundError):
        open_moving_mnist(str(tmp_path / "nope.npy"), 16)  # explicit PATH never falls back


def test_auto_falls_back_to_procedural_digits_with_a_warning(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.warns(UserWarning, match="PROCEDURAL MOVING DIGITS"):
        ds = open_moving_mnist("auto", 16, default_path=tmp_path / "mnist_test_seq.npy")
    assert isinstance(ds, MovingDigits)


def test_auto_uses_the_local_file(mnist_file):
    path, _ = mnist_file
    assert isinstance(open_moving_mnist("auto", 16, default_path=path), MovingMNIST)


def test_procedural_digits_are_reproducible_and_move():
    ds = MovingDigits(n_frames=16)
    a, b, c = ds[(0, 11)], ds[(5, 11)], ds[(0, 12)]
    assert a.shape == (1, 16, 64, 64)
    torch.testing.assert_close(a, b)  # a pure function of the sample seed
    assert not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.min() == 0 and a.max() > 230  # black background, bright strokes
    ink = (a[0] > 127).float()
    assert 0.02 < ink.mean() < 0.3  # two digits, Moving MNIST-like coverage
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centroid = [((ink[t] * xs).sum() / ink[t].sum(), (ink[t] * ys).sum() / ink[t].sum()) for t in (0, 15)]
    assert max(abs(centroid[0][0] - centroid[1][0]), abs(centroid[0][1] - centroid[1][1])) > 2


def test_sampler_is_resumable_without_replacement_and_rank_disjoint():
    sampler = ResumableBatchSampler(10, 4, seed=3)
    batches = [b for _, b in zip(range(5), iter(sampler))]
    resumed = next(iter(ResumableBatchSampler(10, 4, seed=3, start_iteration=3)))
    assert resumed == batches[3]
    first_epoch = [i for b in batches[:2] for i, _ in b] + [i for i, _ in batches[2][:2]]
    assert sorted(first_epoch) == list(range(10))
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)
    r0 = ResumableBatchSampler(10, 2, seed=3, rank=0, world_size=2).batch(0)
    r1 = ResumableBatchSampler(10, 2, seed=3, rank=1, world_size=2).batch(0)
    assert not set(r0) & set(r1)
    assert r0 + r1 == ResumableBatchSampler(10, 4, seed=3).batch(0)


def test_to_unit_range():
    frames = torch.tensor([0, 255, 128], dtype=torch.uint8)
    torch.testing.assert_close(to_unit_range(frames), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    assert to_unit_range(np.zeros((2, 3), np.uint8)).dtype == torch.float32


def test_real_pyramid_levels():
    n, t, h = 4, 16, 64
    # frame k of sample s is filled with 100 * s + k, so every kept frame identifies itself
    x = (torch.arange(n).view(n, 1, 1, 1, 1) * 100 + torch.arange(t).view(1, 1, t, 1, 1)).float()
    x = x.expand(n, 1, t, h, h).clone()
    x[..., ::2] += 0.5  # a spatial pattern the pooling must average
    torch.manual_seed(0)
    levels = real_pyramid(x, [2, 2, 2], [1, 2, 1])
    assert [tuple(v.shape) for v in levels] == [(4, 1, 16, 8, 8), (4, 1, 8, 16, 16), (2, 1, 4, 32, 32),
                                                (2, 1, 2, 64, 64)]
    torch.testing.assert_close(levels[0], F.avg_pool3d(x, (1, 8, 8)))
    frames2 = levels[1][:, 0, :, 0, 0] - 0.25  # pooled value = frame id + mean of the 0.5 pattern
    offset = int(frames2[0, 0])
    assert frames2[0].tolist() == [offset + 2 * k for k in range(8)]
    samples3 = (levels[2][:, 0, 0, 0, 0] // 100).tolist()
    assert samples3 == [0, 2]  # cumulative batch stride
    frames3 = (levels[2][0, 0, :, 0, 0] - 0.25).tolist()
    frames4 = (levels[3][0, 0, :, 0, 0] - 0.5).tolist()  # unpooled: column 0 carries the +0.5
    assert set(frames4) <= set(frames3) and frames4[1] - frames4[0] == 8
    labels = torch.arange(4)
    _, level_labels = real_pyramid(x, [2, 2, 2], [1, 2, 1], labels)
    assert [v.tolist() for v in level_labels] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 2], [0, 2]]


def test_losses_match_the_softplus_formulas():
    y = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(generator_loss(y), torch.log1p(torch.exp(-y)).mean())
    torch.testing.assert_close(discriminator_loss(torch.zeros(4), torch.zeros(2)), torch.tensor(2 * math.log(2)))
    y_real, y_fake = torch.tensor([5.0, 1.0]), torch.tensor([-1.0])
    expected = torch.log1p(torch.exp(-y_real)).mean() + torch.log1p(torch.exp(y_fake)).mean()
    torch.testing.assert_close(discriminator_loss(y_real, y_fake), expected)
    assert generator_loss(y.bfloat16()).dtype == torch.float32


def test_r1_penalty_against_a_hand_computed_value():
    # tiny "discriminator": D(x1, x2) = [a * sum(x1_i^2) for each i] ++ [b . x2_j for each j]
    a, b = 0.5, torch.tensor([1.0, -2.0, 3.0])
    x1 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)  # 2 samples
    x2 = torch.tensor([[1.0, 1.0, 1.0]], requires_grad=True)  # 1 sample
    y = torch.cat([a * (x1**2).sum(1), x2 @ b])
    r1 = r1_penalty(y, [x1, x2])
    # dD/dx1 = 2 a x1 -> sum of squares = 4 a^2 * (1 + 4 + 0 + 1) = 6; dD/dx2 = b -> 1 + 4 + 9 = 14
    torch.testing.assert_close(r1, torch.tensor(20.0))
    r1.backward()  # the penalty is differentiable (double backward)
    torch.testing.assert_close(x1.grad, 8 * a**2 * x1.detach())


def test_lower_render_loss_compares_each_level_with_the_pooled_frame():
    frame = torch.zeros(2, 1, 8, 8)
    frame[:, :, :4, :4] = 1.0  # the top-left quarter lit
    pooled = [torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 4, 4)]
    pooled[0][:, :, 0, 0] = 1.0
    pooled[1][:, :, :2, :2] = 1.0
    assert lower_render_loss(pooled, frame).item() == 0.0
    dark = [torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 4, 4)]
    assert lower_render_loss(dark, frame).item() == pytest.approx(1 / 4 + 4 / 16)
    assert lower_render_loss([x.bfloat16() for x in dark], frame).dtype == torch.float32


def test_grid_gif_and_mp4_round_trip(tmp_path):
    videos = torch.linspace(-1, 1, 5 * 3 * 4 * 6 * 6).view(5, 3, 4, 6, 6)
    grid = make_grid(videos, nrow=3)
    assert grid.shape == (4, 2 * 7 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
    gif = save_video_grid(videos, tmp_path / "s" / "grid.gif", nrow=3)
    frames = iio.imread(gif, index=None)
    assert frames.shape[:3] == (4, 15, 22)
    gray = save_video_grid(videos[:, :1], tmp_path / "gray.gif", nrow=5)
    assert iio.imread(gray, index=None).shape[:3] == (4, 8, 36)
    mp4 = write_video(tmp_path / "v.mp4", np.zeros((6, 15, 22, 1), np.uint8), fps=8)
    import av

    with av.open(str(mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (16, 22, 3)  # padded to even height
    with pytest.raises(ValueError, match="unsupported video format"):
        write_video(tmp_path / "v.avi", np.zeros((2, 4, 4, 1), np.uint8))


def test_checkpoints_are_atomic_and_fall_back(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)
    save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["iteration"] == 2
    assert load_checkpoint(previous_checkpoint_path(path))["iteration"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:100])  # truncated latest checkpoint
    with pytest.warns(UserWarning, match="falling back"):
        assert load_checkpoint(path)["iteration"] == 1
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_checkpoints_refuse_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RuntimeError, match=r"evil.pt: not a plain-tensor checkpoint, refused by torch.load\(weights_only=True\)") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
