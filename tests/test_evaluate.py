"""evaluate.py: IS / Fréchet maths exactly, the C3D loader on stand-in files, I3D TorchScript, caching, CLI."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]

import evaluate  # noqa: E402
from evaluate import (C3D_CONVS, C3D_FCS, EvalModels, InputError, c3d_outputs, c3d_preprocess,  # noqa: E402
                      evaluate_generator, feature_statistics, frechet_distance, i3d_outputs, inception_score,
                      load_c3d, load_i3d, load_statistics, real_statistics, score_generator_is,
                      split_inception_scores)
from models import Generator, model_config  # noqa: E402
from utils import write_video  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Fréchet distance and Inception Score, exactly
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    mu, sigma = rng.normal(size=6), a @ a.T + np.eye(6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_handles_singular_covariances():
    # fewer samples than dimensions, as with 2048 samples of 4096-d fc7 features
    feats = np.random.default_rng(2).normal(size=(3, 8))
    mu, sigma = feature_statistics(feats)
    assert np.linalg.matrix_rank(sigma) < 8
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-5)
    zero = np.zeros((8, 8))
    assert frechet_distance(mu, zero, mu + 1, zero) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


def test_feature_statistics_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(3).normal(size=(50, 4))
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.T))


def test_inception_score_is_one_for_identical_predictions():
    p = np.random.default_rng(4).dirichlet(np.ones(10))
    mean, std = inception_score(np.tile(p, (32, 1)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == 0.0


def test_inception_score_is_k_for_balanced_one_hot_classes():
    k = 7
    probs = np.tile(np.eye(k), (3, 1))  # every split of 7 consecutive rows holds each class once
    assert inception_score(probs)[0] == pytest.approx(k, rel=1e-12)
    np.testing.assert_allclose(split_inception_scores(probs, splits=3), [k, k, k], rtol=1e-12)
    assert inception_score(probs, splits=3) == pytest.approx((k, 0.0))


# ---------------------------------------------------------------------------------------------
# C3D: the loader on stand-in files with the real key names and shapes
# ---------------------------------------------------------------------------------------------


def c3d_arrays(rng: np.random.Generator, names=None) -> dict:
    """Stand-in Chainer arrays ``NAME/W``, ``NAME/b`` with He-uniform weights (keeps activations finite)."""
    shapes = {name: (c_out, c_in, 3, 3, 3) for name, c_in, c_out, _ in C3D_CONVS}
    shapes.update({name: (c_out, c_in) for name, c_in, c_out in C3D_FCS})
    arrays = {}
    for name, shape in shapes.items():
        if names is not None and name not in names:
            continue
        bound = np.float32(np.sqrt(6.0 / np.prod(shape[1:])))
        arrays[f"{name}/W"] = (rng.random(shape, dtype=np.float32) * 2 - 1) * bound
        arrays[f"{name}/b"] = rng.random(shape[0], dtype=np.float32) * 0.1
    return arrays


@pytest.fixture(scope="module")
def c3d_files(tmp_path_factory):
    """Full-size stand-in ``conv3d_deepnetA_ucf.npz`` (~78M parameters) and ``mean2.npz`` (3, 16, 128, 128)."""
    root = tmp_path_factory.mktemp("c3d")
    rng = np.random.default_rng(0)
    weights, mean = root / "conv3d_deepnetA_ucf.npz", root / "mean2.npz"
    np.savez(weights, **c3d_arrays(rng), **{"extra/ignored": np.zeros(2)})
    np.savez(mean, mean=rng.uniform(80, 120, size=(3, 16, 128, 128)).astype(np.float32))
    return weights, mean


@pytest.fixture(scope="module")
def c3d(c3d_files):
    return load_c3d(*c3d_files, device="cpu")


def test_load_c3d_reads_every_layer_and_the_mean_crop(c3d, c3d_files):
    weights, mean = c3d_files
    with np.load(weights) as w:
        for name, layer in c3d.layers():
            np.testing.assert_array_equal(layer.weight.detach().numpy(), w[f"{name}/W"])
            np.testing.assert_array_equal(layer.bias.detach().numpy(), w[f"{name}/b"])
    with np.load(mean) as m:
        np.testing.assert_array_equal(c3d.mean.numpy(), m["mean"][:, :, 8:120, 8:120])
    assert not c3d.training


def test_c3d_shapes_for_a_16x112x112_clip(c3d):
    x = torch.randn(1, 3, 16, 112, 112)
    with torch.no_grad():
        out = c3d.extract(x)
    assert out["pool5"].shape == (1, 512, 1, 4, 4)
    assert out["fc7"].shape == (1, 4096) and out["fc8"].shape == (1, 101)
    assert (out["fc7"] >= 0).all() and torch.isfinite(out["fc8"]).all()


def test_c3d_outputs_of_a_grayscale_video(c3d):
    video = torch.rand(1, 1, 16, 40, 40) * 2 - 1  # one channel, any size: repeated and resized
    out = c3d_outputs(c3d, video)
    assert out["probs"].shape == (1, 101) and out["fc7"].shape == (1, 4096)
    assert out["probs"].sum() == pytest.approx(1.0)


def test_c3d_preprocess_scales_reverses_channels_aligns_corners_and_subtracts_the_mean():
    rgb = torch.tensor([0.5, -0.25, 1.0])
    video = rgb.view(1, 3, 1, 1, 1).expand(1, 3, 16, 2, 2).clone()
    video[0, 0, :, 1, 1] = -1.0  # bottom-right red pixel, to check corner alignment
    mean = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 16, 112, 112)
    x = c3d_preprocess(video, mean)
    assert x.shape == (1, 3, 16, 112, 112)
    bgr = rgb.flip(0)
    np.testing.assert_allclose(x[0, :, 0, 0, 0], bgr * 128 + 128 - torch.arange(3.0), rtol=1e-6)
    # align_corners=True keeps the input corner pixels exactly at the output corners
    assert x[0, 2, 0, -1, -1].item() == pytest.approx(-1.0 * 128 + 128 - 2.0)
    assert x[0, 2, 0, 0, -1].item() == pytest.approx(0.5 * 128 + 128 - 2.0)
    with pytest.raises(InputError, match="16-frame"):
        c3d_preprocess(video[:, :, :8], mean)


def test_load_c3d_names_the_first_missing_key(tmp_path, c3d_files):
    path = tmp_path / "partial.npz"
    np.savez(path, **c3d_arrays(np.random.default_rng(0), names={"conv1a"}))
    with pytest.raises(InputError) as err:
        load_c3d(path, c3d_files[1])
    assert str(path) in str(err.value) and "'conv2a/W'" in str(err.value)
    assert "(128, 64, 3, 3, 3)" in str(err.value)


def test_load_c3d_names_a_wrong_shape_with_expected_and_got(tmp_path, c3d_files):
    arrays = c3d_arrays(np.random.default_rng(0), names={"conv1a", "conv2a"})
    arrays["conv2a/W"] = arrays["conv2a/W"][..., :1]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError) as err:
        load_c3d(path, c3d_files[1])
    message = str(err.value)
    assert str(path) in message and "'conv2a/W'" in message
    assert "(128, 64, 3, 3, 1)" in message and "expected (128, 64, 3, 3, 3)" in message


def test_load_c3d_rejects_missing_files_and_bad_means(tmp_path, c3d_files):
    with pytest.raises(InputError, match="nope.npz: C3D weights .* not found"):
        load_c3d(tmp_path / "nope.npz", c3d_files[1])
    small = tmp_path / "small_mean.npz"
    np.savez(small, mean=np.zeros((3, 16, 112, 112), np.float32))  # too small for the 8:120 crop
    with pytest.raises(InputError, match=r"small_mean.npz: key 'mean' has shape \(3, 16, 112, 112\)"):
        evaluate.load_c3d_mean(small)
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, avg=np.zeros(3))
    with pytest.raises(InputError, match="nokey.npz: missing key 'mean'"):
        evaluate.load_c3d_mean(nokey)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="garbage.npz: not a readable"):
        evaluate.load_c3d_mean(garbage)


# ---------------------------------------------------------------------------------------------
# I3D from TorchScript, statistics caching, the generator path
# ---------------------------------------------------------------------------------------------


class TinyI3D(nn.Module):
    """Stand-in I3D: per-channel means, then the frame count and size it was fed (to check the convention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sizes = torch.tensor([float(x.shape[2]), float(x.shape[3]), float(x.shape[4])]).expand(n, 3)
        return torch.cat([x.mean(dim=(2, 3, 4)), x.amin(dim=(1, 2, 3, 4)).unsqueeze(1), sizes], dim=1)


@pytest.fixture(scope="module")
def i3d_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(TinyI3D()).save(str(path))
    return path


def test_i3d_torchscript_gets_rgb_in_unit_range_at_224(i3d_path):
    i3d = load_i3d(i3d_path)
    video = torch.full((2, 1, 16, 48, 48), -0.5)
    feats = i3d_outputs(i3d, video)["i3d"]
    assert feats.shape == (2, 7)
    np.testing.assert_allclose(feats[:, :3], -0.5, rtol=1e-6)  # grayscale repeated to RGB, range kept
    np.testing.assert_allclose(feats[:, 4:], [[16, 224, 224]] * 2)


def test_load_i3d_rejects_missing_and_non_torchscript_files(tmp_path):
    with pytest.raises(InputError, match="missing.pt: I3D TorchScript file not found"):
        load_i3d(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="bad.pt: not a loadable TorchScript file"):
        load_i3d(bad)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Three readable 16-frame GIFs, a sample grid (to be ignored) and an unreadable file."""
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(5)
    for i in range(3):
        write_video(folder / "class" / f"v_{i}.gif", rng.integers(0, 256, (16, 24, 32, 3), dtype=np.uint8))
    write_video(folder / "grid.gif", np.zeros((16, 8, 8, 3), np.uint8))
    (folder / "broken.mp4").write_bytes(b"not a video")
    return folder


def test_real_statistics_are_cached_and_reread(tmp_path, i3d_path, video_folder, monkeypatch):
    models = EvalModels(i3d=load_i3d(i3d_path), i3d_size=32)
    cache = tmp_path / "stats" / "real_i3d.npz"
    with pytest.warns(UserWarning, match="broken.mp4"):
        mu, sigma = real_statistics(models, "i3d", cache, video_folder, batch_size=2, progress=False)
    assert cache.is_file() and mu.shape == (7,) and sigma.shape == (7, 7)
    with np.load(cache) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["n_videos"] == 3 and meta["skipped"] == 1 and meta["feature"] == "i3d"
    assert sigma[6, 6] == 0.0 and sigma[5, 5] == 0.0  # every clip was fed as 16 x 32 x 32
    # the second call reads the cache and never decodes a video
    monkeypatch.setattr(evaluate, "extract_features", lambda *a, **k: pytest.fail("recomputed"))
    mu2, sigma2 = real_statistics(models, "i3d", cache, video_folder, progress=False)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(InputError, match="holds 'i3d' statistics, expected 'c3d_fc7'"):
        load_statistics(cache, "c3d_fc7")
    with pytest.raises(InputError, match="pass --real-videos"):
        real_statistics(models, "i3d", tmp_path / "absent.npz", None, progress=False)


@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(0)
    return Generator(model_config("movingmnist")).eval()


def test_evaluate_generator_fvd_with_the_stand_in_i3d(i3d_path, tiny_generator):
    i3d = load_i3d(i3d_path)
    feats = np.random.default_rng(6).normal(size=(10, 7))
    models = EvalModels(i3d=i3d, i3d_stats=feature_statistics(feats), i3d_size=32)
    tiny_generator.train()
    result = evaluate_generator(tiny_generator, models, n_samples=3, repeats=2, batch_size=3)
    assert tiny_generator.training  # mode restored
    assert set(result) >= {"FVD", "FVD_std", "FVD_runs"} and "IS" not in result
    assert len(result["FVD_runs"]) == 2 and np.isfinite(result["FVD"]) and result["FVD"] > 0
    again = evaluate_generator(tiny_generator, models, n_samples=3, repeats=2, batch_size=2)
    assert again["FVD_runs"] == pytest.approx(result["FVD_runs"])  # seeded latents, any batch size


def test_score_generator_is_on_the_protocol_path(c3d, tiny_generator):
    mean, std = score_generator_is(tiny_generator, c3d, n_samples=2, repeats=2, batch_size=2)
    assert 1.0 <= mean <= 2.0 + 1e-9 and std >= 0.0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_is_on_a_folder_prints_json(c3d_files, video_folder, capsys):
    weights, mean = c3d_files
    with pytest.warns(UserWarning, match="broken.mp4"):
        code = evaluate.main(["is", "--videos", str(video_folder), "--c3d-weights", str(weights),
                              "--c3d-mean", str(mean), "--json", "--quiet", "--device", "cpu", "--repeats", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "IS" and result["n_samples"] == 3 and result["skipped"] == 1
    assert 1.0 <= result["IS"] <= 3.0 + 1e-9


def test_cli_fvd_from_a_checkpoint_with_cached_stats(tmp_path, i3d_path, video_folder, tiny_generator, capsys):
    from utils import save_checkpoint

    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint({"generator": tiny_generator.state_dict(), "config": {"model": tiny_generator.cfg.to_dict()},
                     "iteration": 7}, ckpt)
    stats = tmp_path / "real.npz"
    argv = ["fvd", "--checkpoint", str(ckpt), "--i3d", str(i3d_path), "--i3d-size", "32", "--real-videos",
            str(video_folder), "--real-stats", str(stats), "--n-samples", "3", "--quiet", "--device", "cpu"]
    with pytest.warns(UserWarning, match="broken.mp4"):
        assert evaluate.main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert stats.is_file() and result["iteration"] == 7 and np.isfinite(result["FVD"])
    assert evaluate.main(argv) == 0  # now from the cache, human-readable
    assert capsys.readouterr().out.startswith(f"FVD {result['FVD']:.4f} (3 samples)")
    assert evaluate.main(argv + ["--level", "9"]) == 1
    assert "levels 1..4" in capsys.readouterr().err


def test_cli_reports_a_bad_file_in_one_line_without_traceback(tmp_path, video_folder):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "is", "--videos", str(video_folder),
         "--c3d-weights", str(tmp_path / "conv3d_deepnetA_ucf.npz"), "--c3d-mean", str(tmp_path / "mean2.npz"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "conv3d_deepnetA_ucf.npz: C3D weights" in proc.stderr
