"""evaluate.py digits: the moving-digit classifier, its cache, the scores, the controls, the hook and the CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from datasets import MovingDigits
from evaluate import (DigitClassifierSettings, clip_motion, digit_centres, digit_controls, digit_metrics_for_generator,
                      frame_digit_sets, load_digit_classifier, procedural_clips, real_digit_summary, true_digit_sets)
from models import Generator, model_config, sampling_mode
from utils import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# a few seconds of training: enough for the controls' ordering, not for a useful classifier
TINY = DigitClassifierSettings(n_clips=240, frames_per_clip=4, epochs=3, n_test_clips=8)
SCORES = {"digit_score", "effective_digits", "identity_consistency", "adjacent_agreement", "frechet_distance",
          "motion", "motion_ratio", "diversity", "diversity_ratio", "first_frame_jump", "ink_drift",
          "real_digit_score", "real_effective_digits", "real_identity_consistency", "real_adjacent_agreement",
          "real_motion", "real_diversity", "real_first_frame_jump", "real_ink_drift"}


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "digits.pt"
    load_digit_classifier(path, TINY, "cpu", progress=False)
    return path


@pytest.fixture(scope="module")
def classifier(classifier_path):
    return load_digit_classifier(classifier_path, TINY, "cpu", progress=False)


@pytest.fixture
def tiny_cli(monkeypatch, classifier_path):
    """The CLI with the tiny training settings and the module's cached classifier."""
    monkeypatch.setattr(evaluate, "DIGIT_CLASSIFIER_SETTINGS", TINY)
    return ["--classifier", str(classifier_path), "--n-real", "12", "--frames", "8", "--quiet", "--device", "cpu"]


def test_clip_gives_the_same_video_as_before_and_its_digits():
    ds = MovingDigits(n_frames=16)
    videos = torch.stack([ds[(i, 1000 + i)] for i in range(20)])
    # sha256 of these 20 clips as written by MovingDigits.__getitem__ before clip() existed
    assert hashlib.sha256(videos.numpy().tobytes()).hexdigest() == \
        "1cf932009afa7372703c00686666d9f1c5a189eeec855478d68ff474de1d01c5"
    video, digits = ds.clip((3, 1003))
    assert torch.equal(video, videos[3])
    assert digits.shape == (2,) and digits.dtype == np.int64 and ((0 <= digits) & (digits <= 9)).all()
    # the digits are the first draw of each digit's stream: a clip with one digit shows the first one alone
    single = MovingDigits(n_frames=16, n_digits=1)
    one_video, one_digit = single.clip((3, 1003))
    assert one_digit[0] == digits[0] and (one_video <= video).all()


def test_frame_sets_take_the_runner_up_only_when_it_is_present():
    presence = np.full((4, 10), 0.01)
    presence[0, [2, 7]] = [0.9, 0.35]  # two digits
    presence[1, 4] = 0.95  # the same digit twice: one
    presence[1, 5] = 0.25
    presence[2, [1, 3]] = [0.6, 0.1]  # one digit
    presence[3, [1, 3]] = [0.45, 0.4]  # no digit is sure: none
    assert frame_digit_sets(presence).tolist() == [(1 << 2) | (1 << 7), 1 << 4, 1 << 1, 0]
    assert true_digit_sets(np.array([[2, 7], [4, 4]])).tolist() == [(1 << 2) | (1 << 7), 1 << 4]


def test_identity_consistency_counts_frames_in_the_most_frequent_set():
    sure = {d: np.eye(10)[d] * 0.98 + 0.01 for d in range(10)}
    clips = np.stack([
        [sure[3]] * 4,  # one digit all along: 1
        [sure[3], sure[5], sure[3], sure[3]],  # one frame differs: 3/4
        [np.full(10, 0.2)] * 4,  # no sure digit in any frame: 0
    ])
    outputs = {"presence": clips, "features": np.random.default_rng(0).normal(size=(3, 4, 8)), "motion": np.ones(3),
               "ink": np.full((3, 4), 0.1)}
    summary = evaluate.digit_summary(outputs)
    assert summary["identity_consistency"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert summary["adjacent_agreement"] == pytest.approx((3 + 1 + 0) / 9)  # agreeing pairs: 3, then 1 (3-3), then 0
    assert summary["motion"] == 1.0 and summary["stats"][0].shape == (8,)


def test_effective_digits_count_the_digits_the_frames_show():
    sure = np.eye(10) * 0.98 + 0.01
    unsure = np.full(10, 0.2)  # no digit is sure: the frame shows none and is left out
    outputs = {"features": np.random.default_rng(0).normal(size=(2, 10, 4)), "motion": np.ones(2),
               "ink": np.full((2, 10), 0.1)}
    every_digit = evaluate.digit_summary({**outputs, "presence": np.stack([sure, sure[::-1]])})
    assert every_digit["effective_digits"] == pytest.approx(10.0)
    collapsed = evaluate.digit_summary({**outputs, "presence": np.stack([sure[[8] * 10]] * 2)})
    assert collapsed["effective_digits"] == pytest.approx(1.0)
    mostly_blank = np.stack([[unsure] * 8 + [sure[3], sure[5]], [unsure] * 10])
    assert evaluate.digit_summary({**outputs, "presence": mostly_blank})["effective_digits"] == pytest.approx(2.0)
    # a two-digit frame splits its unit: 3 and 8 shown equally often, perplexity 2; no digit shown at all: 0
    pair = np.array([(1 << 3) | (1 << 8), 1 << 3, 1 << 8])
    assert evaluate.effective_digits(pair) == pytest.approx(2.0)
    assert evaluate.effective_digits(np.array([1 << 3, 1 << 3, 1 << 3, 1 << 8])) == pytest.approx(
        np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
    assert evaluate.effective_digits(np.zeros((2, 5), np.int64)) == 0.0


def test_adjacent_agreement_tells_flicker_from_drift():
    sure = np.eye(10) * 0.98 + 0.01
    drift = np.stack([sure[[3] * 4 + [8] * 4]] * 2)  # a 3 that turns into an 8 once
    flicker = np.stack([sure[[3, 8] * 4]] * 2)  # the reading alternates every frame
    outputs = {"features": np.zeros((2, 8, 4)), "motion": np.ones(2), "ink": np.full((2, 8), 0.1)}
    drifting = evaluate.digit_summary({**outputs, "presence": drift})
    flickering = evaluate.digit_summary({**outputs, "presence": flicker})
    assert drifting["identity_consistency"] == flickering["identity_consistency"] == pytest.approx(0.5)
    assert drifting["adjacent_agreement"] == pytest.approx(6 / 7) and flickering["adjacent_agreement"] == 0.0


def test_first_frame_jump_compares_frame_0s_change_with_the_later_changes():
    features = np.cumsum(np.ones((2, 5, 3)), axis=1)  # every frame one step from the last: 1
    outputs = {"presence": np.full((2, 5, 10), 0.5), "features": features, "motion": np.ones(2),
               "ink": np.full((2, 5), 0.1)}
    assert evaluate.digit_summary(outputs)["first_frame_jump"] == pytest.approx(1.0)
    features[:, 0] -= 3  # frame 0 four steps away from frame 1
    assert evaluate.digit_summary(outputs)["first_frame_jump"] == pytest.approx(4.0)
    with pytest.raises(evaluate.InputError, match="at least 3 frames"):
        evaluate.digit_summary({**outputs, "presence": outputs["presence"][:, :2], "features": features[:, :2]})


def test_ink_drift_is_the_brightest_frame_over_the_dimmest():
    videos = torch.full((2, 1, 4, 64, 64), -1.0)
    videos[:, :, :, 20:40, 20:40] = 1.0  # the same digit-sized square in every frame: drift 1
    classifier = evaluate.DigitClassifier().eval()
    outputs = evaluate.digit_frame_outputs(classifier, videos)
    assert outputs["ink"].shape == (2, 4) and evaluate.digit_summary(outputs)["ink_drift"] == pytest.approx(1.0)
    videos[:, :, 0] = videos[:, :, 0] * 0.5 - 0.5  # frame 0 at half the intensity: drift 2
    outputs = evaluate.digit_frame_outputs(classifier, videos)
    assert evaluate.digit_summary(outputs)["ink_drift"] == pytest.approx(2.0)


def test_digit_centres_find_two_blobs_and_motion_pairs_them():
    frames = torch.full((3, 64, 64), -1.0)
    frames[0, 10:14, 20:24] = 1  # centre (22, 12)
    frames[0, 40:44, 50:54] = 1  # centre (52, 42)
    frames[1] = frames[0].roll((2, 3), dims=(0, 1))  # both move by (3, 2)
    centres = digit_centres(frames)
    found = sorted(centres[0].tolist())
    np.testing.assert_allclose(found, [[22, 12], [52, 42]], atol=0.6)
    assert torch.equal(centres[2], torch.tensor([[32.0, 32.0], [32.0, 32.0]]))  # empty frame: the centre
    clip = frames[None, None, :2]
    assert clip_motion(clip).item() == pytest.approx(np.hypot(3, 2), abs=0.6)
    assert clip_motion(clip.flip(2)).item() == pytest.approx(np.hypot(3, 2), abs=0.6)
    assert clip_motion(frames[None, None, :1].expand(1, 1, 5, 64, 64)).item() == 0.0


def test_real_procedural_digits_move_about_3_5_pixels_per_frame():
    videos = evaluate.to_unit_range(procedural_clips(16, 16, 7)[0])
    motion = clip_motion(videos)
    assert 3.0 < motion.mean().item() < 3.7  # 3.6 px per digit, less at bounces and overlaps


def test_classifier_cache_is_reused_and_retrained_when_settings_change(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "digits.pt"
    tiny = DigitClassifierSettings(n_clips=16, frames_per_clip=2, epochs=1, n_test_clips=2)
    first = load_digit_classifier(path, tiny, "cpu", progress=False)
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == evaluate.DIGIT_CLASSIFIER_FORMAT and saved["settings"]["n_clips"] == 16
    assert 0.0 <= saved["info"]["accuracy"] <= 1.0 and saved["info"]["train_seconds"] > 0
    written = path.stat().st_mtime_ns
    assert load_digit_classifier(path, tiny, "cpu", progress=False) is first  # same process: kept in memory

    evaluate._DIGIT_CLASSIFIERS.clear()  # a new process: read from the file, never trained
    trained = []
    real_train = evaluate.train_digit_classifier
    monkeypatch.setattr(evaluate, "train_digit_classifier", lambda *a, **k: trained.append(a) or real_train(*a, **k))
    again = load_digit_classifier(path, tiny, "cpu", progress=False)
    assert trained == [] and path.stat().st_mtime_ns == written
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name])
    assert again.info == first.info and not again.training

    changed = DigitClassifierSettings(n_clips=16, frames_per_clip=2, epochs=2, n_test_clips=2)
    load_digit_classifier(path, changed, "cpu", progress=False)
    assert len(trained) == 1 and torch.load(path, weights_only=True)["settings"]["epochs"] == 2

    evaluate._DIGIT_CLASSIFIERS.clear()
    path.write_bytes(b"truncated")  # an unreadable cache is replaced
    load_digit_classifier(path, changed, "cpu", progress=False)
    assert len(trained) == 2 and torch.load(path, weights_only=True)["settings"]["epochs"] == 2


def test_no_digit_frames_are_noise_constant_or_shuffled_digit_frames():
    frames, _ = procedural_clips(4, 2, seed=5)
    frames = frames[:, 0].reshape(-1, 1, 64, 64)
    negatives = evaluate.no_digit_frames(frames, 9, seed=3)
    assert negatives.shape == (9, 1, 64, 64) and negatives.dtype == np.uint8
    assert np.array_equal(negatives, evaluate.no_digit_frames(frames, 9, seed=3))
    noise, constant, shuffled = negatives[0::3], negatives[1::3], negatives[2::3]
    assert all(len(np.unique(f)) > 200 for f in noise)
    assert all(len(np.unique(f)) == 1 for f in constant)
    histograms = {tuple(np.bincount(f.ravel(), minlength=256)) for f in frames}
    assert all(tuple(np.bincount(f.ravel(), minlength=256)) in histograms for f in shuffled)


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    tiny = DigitClassifierSettings(n_clips=8, frames_per_clip=2, epochs=1, n_test_clips=2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = evaluate.train_digit_classifier(tiny, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = evaluate.train_digit_classifier(tiny, progress=False)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name])


def test_controls_score_worse_than_held_out_real(classifier):
    real = real_digit_summary(classifier, n_real=48, n_frames=8)
    rows = digit_controls(classifier, real, n_clips=48, n_frames=8)
    held_out = rows["held-out real"]
    assert 0.85 < held_out["motion_ratio"] < 1.15 and 0.85 < held_out["diversity_ratio"] < 1.15
    assert rows["frozen"]["motion"] == 0.0
    assert rows["shuffled"]["motion_ratio"] > 2.0
    assert rows["blurred"]["frechet_distance"] > 3 * held_out["frechet_distance"]
    assert rows["noise"]["frechet_distance"] > 10 * held_out["frechet_distance"]
    assert rows["noise"]["motion_ratio"] > 2.0 and rows["noise"]["diversity_ratio"] < 0.7
    # one clip repeated (the tiny classifier is too weak to read its digits; the README's table has a real one)
    assert rows["one clip"]["effective_digits"] <= 2.0 + 1e-6
    assert rows["one clip"]["diversity"] == pytest.approx(0.0, abs=1e-6) and rows["one clip"]["motion_ratio"] > 0.5
    assert 0.5 < rows["carried"]["motion_ratio"] < 1.2  # frame 0 moved at the real speed, bouncing
    # the "no digit" training frames: the classifier is far less sure of any digit in noise than in real frames
    real_clips = torch.from_numpy(procedural_clips(8, 8, seed=7)[0]).float() / 127.5 - 1
    noise_clips = evaluate.control_clips(real_clips, "noise", torch.Generator().manual_seed(0))
    top = {name: evaluate.digit_frame_outputs(classifier, clips)["presence"].max(-1).mean()
           for name, clips in (("real", real_clips), ("noise", noise_clips))}
    assert top["noise"] < 0.5 * top["real"]
    for row in rows.values():
        assert set(row) == SCORES - {k for k in SCORES if k.startswith("real_")}
        assert all(np.isfinite(v) for v in row.values())


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return Generator(model_config("movingmnist"))


def test_sampling_mode_uses_batch_statistics_and_restores_everything(generator):
    generator.train()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    z = generator.sample_z(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with sampling_mode(generator, "eval"):
            assert not any(m.training for m in generator.modules())
            running = generator.generate(z, n_frames=2)
        with sampling_mode(generator, "train"):
            batch = generator.generate(z, n_frames=2)
    assert not torch.allclose(running, batch)
    assert all(m.training for m in generator.modules())
    for name, value in generator.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    with pytest.raises(ValueError, match="bn_mode"):
        with sampling_mode(generator, "batch"):
            pass


def test_hook_returns_floats_and_scores_the_real_clips_once(generator, classifier_path, monkeypatch):
    kwargs = dict(n_samples=3, n_frames=4, seed=5, batch_size=2, n_real=6, classifier_path=classifier_path,
                  settings=TINY)
    generator.train()
    first = digit_metrics_for_generator(generator, **kwargs)
    assert set(first) == SCORES | {"recurrent_z_share"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in first.values())
    assert generator.training
    monkeypatch.setattr(evaluate, "real_digit_batches", lambda *a, **k: pytest.fail("real clips scored again"))
    monkeypatch.setattr(evaluate, "train_digit_classifier", lambda *a, **k: pytest.fail("classifier retrained"))
    again = digit_metrics_for_generator(generator, **kwargs)
    assert again == pytest.approx(first)  # the same latents every call
    train_bn = digit_metrics_for_generator(generator, **kwargs, bn_mode="train")
    assert train_bn["frechet_distance"] != pytest.approx(first["frechet_distance"])


def test_recurrent_z_share_is_one_when_z_sets_the_state_and_zero_when_nothing_does(generator):
    z = generator.sample_z(16, generator=torch.Generator().manual_seed(0))
    share = evaluate.recurrent_z_share(generator, z, n_frames=5)
    assert share.shape == (5,) and 0.9 < share[0] <= 1  # step 0 is z's projection through the input conv
    with torch.no_grad():
        generator.fc.weight.zero_()  # every sample now gets fc's bias alone: one shared trajectory
    assert evaluate.recurrent_z_share(generator, z, n_frames=5) == pytest.approx(torch.zeros(5), abs=1e-6)


def test_carried_clips_move_each_frame_unchanged_by_whole_pixels_and_bounce():
    frames = torch.full((3, 1, 64, 64), -1.0)
    frames[:, 0, 30, 32] = 1.0
    clips = evaluate.carried_clips(frames, 24, 3.5, torch.Generator().manual_seed(0), reach=10)
    assert clips.shape == (3, 1, 24, 64, 64) and torch.equal(clips[:, :, 0], frames)
    assert set(clips.unique().tolist()) == {-1.0, 1.0}  # whole pixels: nothing resampled
    for clip in clips[:, 0]:
        dots = torch.stack([(frame == 1).nonzero()[0] for frame in clip])  # one dot in every frame
        assert (clip == 1).sum() == 24
        assert (dots - torch.tensor([30, 32])).abs().max() <= 10  # within reach of where it was drawn
        steps = (dots[1:] - dots[:-1]).float().norm(dim=1)
        assert steps.max() <= 3.5 + 1.5 and steps.mean() > 2.0  # about the speed, bounces included


def test_carried_identity_scores_still_frames_on_the_carried_controls_paths(classifier, classifier_path, monkeypatch):
    made = []  # every batch of carried clips, in order
    carry = evaluate.carried_clips
    monkeypatch.setattr(evaluate, "carried_clips", lambda *args, **kw: made.append(carry(*args, **kw)) or made[-1])
    real = real_digit_summary(classifier, n_real=48, n_frames=8)
    control = digit_controls(classifier, real, n_clips=48, n_frames=8)["carried"]["identity_consistency"]
    from_control, made[:] = torch.cat(made), []
    gen = Generator(model_config("movingmnist", n_frames=8, motion_warp=True, content_skip=True)).eval()
    held_out = torch.from_numpy(procedural_clips(48, 8, evaluate.HELD_OUT_DIGITS_SEED)[0][:, :, 0]).float() / 127.5 - 1
    frames = iter(held_out.split(32))  # still frames that are the control's real frames, in its batches
    gen.still_frame = lambda z, labels=None: next(frames)
    scores = digit_metrics_for_generator(gen, n_samples=48, n_frames=8, batch_size=32, n_real=48,
                                         classifier_path=classifier_path, settings=TINY)
    assert from_control.shape == (48, 1, 8, 64, 64) and torch.equal(torch.cat(made), from_control)
    assert scores["carried_identity"] == control
    assert (from_control[:, :, 1:] != from_control[:, :, :1]).any(dim=(1, 2, 3, 4)).all()  # every clip moves


def test_warp_statistics_tell_a_carried_glyph_from_a_stretched_one(classifier_path):
    torch.manual_seed(0)
    gen = Generator(model_config("movingmnist", motion_warp=True, content_skip=True)).eval()
    z = gen.sample_z(4, generator=torch.Generator().manual_seed(0))
    still = evaluate.warp_statistics(gen, z, n_frames=3)  # the flow head starts at zero
    assert still["shift"] == pytest.approx(torch.zeros(3)) and still["distortion"] == pytest.approx(torch.zeros(3))
    assert still["shared"] == pytest.approx(torch.zeros(3))
    with torch.no_grad():
        gen.flow_head.bias.copy_(torch.tensor([0.25, 0.0]))  # every pixel reads a quarter width (8 px) to its right
    carried = evaluate.warp_statistics(gen, z, n_frames=3)
    assert carried["shift"] == pytest.approx(torch.full((3,), 8.0)) and carried["distortion"] == pytest.approx(
        torch.zeros(3), abs=1e-5)
    assert carried["shared"] == pytest.approx(torch.ones(3))  # a bias alone: every clip gets the same flow
    # A flow growing by 1/64 units (half a pixel) per pixel along x stretches areas 1.5 times.
    ramp = torch.zeros(2, 1, 2, 64, 64)
    ramp[:, :, 0] = torch.arange(64.0) / 64
    original = gen.content_and_flow
    gen.content_and_flow = lambda z, n_frames, labels=None: (original(z, n_frames)[0], ramp)
    stretched = evaluate.warp_statistics(gen, z[:2], n_frames=1)
    assert stretched["distortion"].item() == pytest.approx(0.5) and stretched["shift"].item() == pytest.approx(15.75)
    opposite = torch.zeros(2, 1, 2, 8, 8)
    opposite[0, :, 0], opposite[1, :, 0] = 0.25, -0.25  # two clips moved apart: no flow in common
    gen.content_and_flow = lambda z, n_frames, labels=None: (original(z, n_frames)[0], opposite)
    assert evaluate.warp_statistics(gen, z[:2], n_frames=1)["shared"].item() == pytest.approx(0.0)
    del gen.content_and_flow
    scores = digit_metrics_for_generator(gen, n_samples=3, n_frames=4, batch_size=2, n_real=6,
                                         classifier_path=classifier_path, settings=TINY)
    assert scores["warp_shift"] == pytest.approx(8.0) and scores["warp_distortion"] == pytest.approx(0, abs=1e-5)
    assert scores["warp_shared"] == pytest.approx(1.0)
    assert 0 <= scores["carried_identity"] <= 1
    with pytest.raises(ValueError, match="motion-warp"):
        evaluate.warp_statistics(Generator(model_config("movingmnist")), z)


def test_cli_json_on_an_npy_file(tmp_path, tiny_cli, capsys):
    clips = procedural_clips(5, 10, 99)[0][:, 0]  # uint8 (N, T, H, W)
    path = tmp_path / "clips.npy"
    np.save(path, clips)
    assert evaluate.main(["digits", "--npy", str(path), "--json", *tiny_cli]) == 0
    result = json.loads(capsys.readouterr().out)
    assert SCORES <= set(result) and result["n_samples"] == 5 and result["n_real"] == 12
    assert result["source"] == str(path) and 0 <= result["classifier_accuracy"] <= 1
    assert 0.7 < result["motion_ratio"] < 1.3  # real clips against real clips
    float_path = tmp_path / "clips_float.npy"  # float clips in [-1, 1], with a channel axis
    np.save(float_path, (clips[:, None].astype(np.float32) / 127.5 - 1))
    assert evaluate.main(["digits", "--npy", str(float_path), "--json", "--n-samples", "4", *tiny_cli]) == 0
    as_float = json.loads(capsys.readouterr().out)
    assert as_float["n_samples"] == 4 and np.isfinite(as_float["frechet_distance"])


def test_cli_on_gifs_against_a_moving_mnist_layout_file(tmp_path, tiny_cli, capsys):
    from utils import write_video

    clips = procedural_clips(4, 8, 98)[0][:, 0]  # uint8 (N, T, H, W)
    for i, clip in enumerate(clips[:3]):
        write_video(tmp_path / "videos" / f"video_{i:04d}.gif", clip[..., None])
    real = tmp_path / "mnist_layout.npy"
    np.save(real, procedural_clips(6, 10, 97)[0][:, 0].transpose(1, 0, 2, 3))  # (T, N, H, W) like mnist_test_seq
    argv = ["digits", "--videos", str(tmp_path / "videos"), "--real", str(real), "--json", *tiny_cli]
    assert evaluate.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_samples"] == 3 and result["real"] == str(real) and SCORES <= set(result)
    assert 0.6 < result["motion_ratio"] < 1.4
    (tmp_path / "empty").mkdir()
    assert evaluate.main(argv + ["--real", str(tmp_path / "empty")]) == 1
    assert "empty: no videos" in capsys.readouterr().err


def test_cli_scores_a_checkpoint_as_json_and_as_text(tmp_path, generator, tiny_cli, capsys):
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint({"generator": generator.state_dict(), "config": {"model": generator.cfg.to_dict()},
                     "iteration": 2}, ckpt)
    argv = ["digits", "--checkpoint", str(ckpt), "--n-samples", "3", "--batch-size", "3", "--json", *tiny_cli]
    assert evaluate.main(argv) == 0
    running = json.loads(capsys.readouterr().out)
    assert running["iteration"] == 2 and running["bn_mode"] == "eval" and SCORES <= set(running)
    assert running["rigid_cells"] == 0 and running["wall_bounce"] is False
    assert evaluate.main(argv + ["--bn-mode", "train"]) == 0
    assert json.loads(capsys.readouterr().out)["bn_mode"] == "train"
    assert evaluate.main(argv[:-1 - len(tiny_cli)] + tiny_cli) == 0  # text output
    text = capsys.readouterr().out
    assert "(iteration 2, BatchNorm eval, rigid cells 0)" in text and "frechet_distance" in text
    assert evaluate.main(argv + ["--rigid-cells", "2"]) == 1  # this generator renders every frame: nothing to carry
    assert capsys.readouterr().err == (f"evaluate.py: error: {ckpt}: --rigid-cells 2 needs a motion-warp generator; "
                                       "this one has none\n")
    assert evaluate.main(argv + ["--wall-bounce"]) == 1  # no rigid cells, nothing to fold
    assert capsys.readouterr().err == (f"evaluate.py: error: {ckpt}: --wall-bounce needs rigid cells "
                                       "(--rigid-cells N > 0)\n")


def test_cli_controls_print_a_markdown_table(tiny_cli, capsys):
    assert evaluate.main(["digits", "--controls", *tiny_cli]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| clips | digit_score | effective_digits | identity_consistency | adjacent_agreement |")
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        "| real (reference)", "| held-out real", "| blurred", "| frozen", "| shuffled", "| noise", "| one clip",
        "| carried"]


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), np.uint8))
    for argv, message in (([], "give --checkpoint CKPT, --videos DIR or --npy FILE"),
                          (["--npy", str(bad)], "bad.npy: expected a uint8 or float array"),
                          (["--npy", str(tmp_path / "absent.npy")], "absent.npy: no such .npy file"),
                          (["--controls", "--npy", str(bad)], "--controls scores held-out real clips")):
        proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "digits", *argv, "--device", "cpu"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
        assert message in proc.stderr
