"""What a run leaves behind for a user: TensorBoard events, a config to rerun, config history, usable snapshots."""

import json
import warnings

import numpy as np
import pytest
import torch

import datasets
import evaluate
import generate
import train_movingmnist
import train_ucf101
from models import load_generator
from test_training import TinyI3D
from utils import InputError, load_checkpoint, save_checkpoint

FAST = ["--data", "synthetic", "--batch-size", "2", "--workers", "0", "--sample-grid", "2", "--log-every", "1",
        "--device", "cpu"]


def run(out, *extra):
    return train_movingmnist.main([*FAST, "--out", str(out), *extra])


def test_tensorboard_events_hold_losses_learning_rates_speed_and_animated_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "--iterations", "3", "--sample-every", "1", "--tensorboard", "--frame-warmup", "1")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/G", "loss/D", "loss/R1", "loss/frame_G", "loss/frame_D", "learning_rate/G", "learning_rate/D",
            "speed/iterations_per_second"} <= set(tags["scalars"])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss/frame_D")] == [1, 2, 3]  # the frame warm-up, then video iterations
    assert [e.step for e in events.Scalars("loss/G")] == [2, 3] == [e.step for e in events.Scalars("loss/frame_G")]
    assert [e.value for e in events.Scalars("loss/G")] == pytest.approx([m["loss_g"] for m in metrics[1:]])
    assert [e.value for e in events.Scalars("learning_rate/D")] == pytest.approx([1e-4] * 3)
    images = events.Images("samples")
    assert [image.step for image in images] == [1, 2, 3]
    gif = (tmp_path / "samples" / "iter_000002.gif").read_bytes()
    assert images[1].encoded_image_string == gif and gif.startswith(b"GIF8")
    assert (images[1].width, images[1].height) == (2 * 65 + 1, 2 * 65 + 1)


def test_no_tensorboard_writes_no_events(tmp_path):
    run(tmp_path, "--iterations", "1", "--no-tensorboard")
    assert not (tmp_path / "tensorboard").exists()


def test_config_json_reruns_the_experiment(tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    run(first, "--iterations", "2", "--seed", "3", "--lr-g", "2e-4", "--subsample-batch", "1,2,1",
        "--snapshot-every", "0")
    train_movingmnist.main(["--config", str(first / "config.json"), "--out", str(again), "--device", "cpu"])
    a, b = (json.loads((run_dir / "config.json").read_text()) for run_dir in (first, again))
    assert b["out"] == str(again)
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert (b["seed"], b["lr_g"], b["subsample_batch"], b["iterations"]) == (3, 2e-4, [1, 2, 1], 2)
    ckpt_a, ckpt_b = load_checkpoint(first / "checkpoint.pt"), load_checkpoint(again / "checkpoint.pt")
    for name, tensor in ckpt_a["generator"].items():
        assert torch.equal(tensor, ckpt_b["generator"][name]), f"generator.{name} differs in the rerun"
    # flags given with --config override it; the earlier run's own folder is refused
    override = tmp_path / "override"
    train_movingmnist.main(["--config", str(first / "config.json"), "--out", str(override), "--iterations", "1"])
    assert json.loads((override / "config.json").read_text())["iterations"] == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_movingmnist.main(["--config", str(first / "config.json"), "--out", str(first)])
    assert exit_info.value.code == 1
    assert "is that run's own folder" in capsys.readouterr().err


def test_resume_keeps_the_first_config_and_writes_one_per_resume(tmp_path):
    run(tmp_path, "--iterations", "2")
    run(tmp_path, "--iterations", "3", "--resume")
    run(tmp_path, "--iterations", "4", "--resume")
    assert json.loads((tmp_path / "config.json").read_text())["iterations"] == 2
    assert json.loads((tmp_path / "config.resume-000002.json").read_text())["iterations"] == 3
    assert json.loads((tmp_path / "config.resume-000003.json").read_text())["iterations"] == 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["iterations"] == 4


def test_data_auto_is_saved_as_what_it_found_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys):
    def offline(dest, *args, **kwargs):
        raise OSError("no network in the tests")

    monkeypatch.setattr(datasets, "download_moving_mnist", offline)
    monkeypatch.chdir(tmp_path)  # --data auto looks for data/mnist_test_seq.npy here
    auto = FAST[2:]  # FAST without --data synthetic
    with pytest.warns(UserWarning, match="PROCEDURAL MOVING DIGITS"):
        train_movingmnist.main([*auto, "--out", "procedural", "--iterations", "1"])
    assert json.loads((tmp_path / "procedural" / "config.json").read_text())["data"] == "synthetic"
    # The real file appears; resuming with --data left at auto stays on the procedural digits.
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "mnist_test_seq.npy", np.zeros((20, 2, 64, 64), np.uint8))
    capsys.readouterr()
    train_movingmnist.main([*auto, "--out", "procedural", "--iterations", "2", "--resume"])
    assert "--resume: using data='synthetic' from the checkpoint" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "procedural" / "checkpoint.pt")["config"]["data"] == "synthetic"
    # A run that found the file names it; an explicit --data on resume is taken as given.
    train_movingmnist.main([*auto, "--out", "real", "--iterations", "1"])
    assert json.loads((tmp_path / "real" / "config.json").read_text())["data"] == "data/mnist_test_seq.npy"
    capsys.readouterr()
    train_movingmnist.main([*auto, "--out", "procedural", "--iterations", "3", "--resume", "--data",
                            "data/mnist_test_seq.npy"])
    assert "using data=" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "procedural" / "checkpoint.pt")["config"]["data"] == "data/mnist_test_seq.npy"


def test_runs_from_before_the_motion_warp_resume_and_rerun_without_it(tmp_path):
    old = tmp_path / "old"
    run(old, "--iterations", "1", "--no-motion-warp", "--snapshot-every", "0")
    ckpt = load_checkpoint(old / "checkpoint.pt")
    del ckpt["config"]["motion_warp"], ckpt["config"]["model"]["motion_warp"]  # as runs before the option wrote them
    save_checkpoint(ckpt, old / "checkpoint.pt")
    settings = json.loads((old / "config.json").read_text())
    del settings["motion_warp"], settings["model"]["motion_warp"]
    (old / "config.json").write_text(json.dumps(settings))
    run(old, "--iterations", "2", "--resume")  # the default recipe warps, but this run renders every frame
    resumed = load_checkpoint(old / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["motion_warp"] is False
    assert not any(name.startswith("flow_head") for name in resumed["generator"])
    train_movingmnist.main(["--config", str(old / "config.json"), "--out", str(tmp_path / "again"), "--device", "cpu"])
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model"]["motion_warp"] is False


def test_runs_from_before_the_frame_warmup_resume_without_it(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "0", "--frame-dis-weight", "0", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["config"]["frame_warmup"], ckpt["config"]["frame_dis_weight"]  # as runs before the options wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "2", "--resume")  # the default recipe has a warm-up, this run had none
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["frame_warmup"] == 0
    assert "frame_discriminator" not in resumed and resumed["config"]["motion_warp"] is True


def test_runs_from_before_the_frame_discriminator_weight_resume_without_it(tmp_path):
    run(tmp_path, "--iterations", "2", "--frame-warmup", "1", "--frame-dis-weight", "0", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["config"]["frame_dis_weight"]  # as runs before the option wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "3", "--resume")  # the default recipe keeps the frame discriminator on
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 3 and resumed["config"]["frame_dis_weight"] == 0.0
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["iteration"] == 3 and "loss_g" in last and "loss_frame_g" not in last


def test_runs_from_before_the_warmup_learning_rate_resume_with_the_video_rates(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "3", "--snapshot-every", "0")
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["lr_g"] == 2e-4
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["config"]["warmup_lr"]  # as runs before the option wrote it
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "2", "--resume")  # still in the warm-up, at the rate that run had
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["warmup_lr"] == 0.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["lr_g"] == 1e-4


def test_runs_from_before_the_deviation_channel_resume_without_it(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "1", "--frame-dis-group", "0", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["config"]["frame_dis_group"]  # as runs before the option wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "2", "--resume")  # the default recipe has the channel, this run had none
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["frame_dis_group"] == 0
    assert resumed["frame_discriminator"]["layers.12.weight"].shape == (1, 256 * 4 * 4)


def test_runs_from_before_rigid_cells_resume_and_sample_without_them(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "1", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["config"]["rigid_cells"] == 1 and ckpt["config"]["model"]["rigid_cells"] == 1  # the default recipe
    for config in (ckpt["config"], ckpt["config"]["model"]):  # as runs before the option (and the settings after it)
        del config["rigid_cells"], config["still_first_frame"], config["wall_bounce"]
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    assert load_generator(tmp_path / "checkpoint.pt")[0].cfg.rigid_cells == 0  # sampled as they were
    assert load_generator(tmp_path / "checkpoint.pt", rigid_cells=2)[0].cfg.rigid_cells == 2  # or with the cells
    run(tmp_path, "--iterations", "2", "--resume")
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["rigid_cells"] == 0
    assert resumed["config"]["model"]["rigid_cells"] == 0


@pytest.mark.parametrize("name", ["still_first_frame", "wall_bounce"])
def test_runs_from_before_a_rigid_cell_setting_resume_and_sample_without_it(name, tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "1", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["config"][name] is True and ckpt["config"]["model"][name] is True  # the default recipe
    del ckpt["config"][name], ckpt["config"]["model"][name]  # as older runs wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    assert not getattr(load_generator(tmp_path / "checkpoint.pt")[0].cfg, name)  # sampled as they were
    assert getattr(load_generator(tmp_path / "checkpoint.pt", **{name: True})[0].cfg, name)
    assert not getattr(load_generator(tmp_path / "checkpoint.pt", rigid_cells=0)[0].cfg, name)
    with pytest.raises(InputError, match=f"--{name.replace('_', '-')} needs rigid cells"):
        load_generator(tmp_path / "checkpoint.pt", rigid_cells=0, **{name: True})
    run(tmp_path, "--iterations", "2", "--resume")
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"][name] is False
    assert resumed["config"]["model"][name] is False


def test_runs_from_before_the_glyph_average_resume_without_it(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "1", "--glyph-average", "0", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert "generator_average" not in ckpt
    del ckpt["config"]["glyph_average"]  # as runs before the option wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "2", "--resume")  # the default recipe keeps an average, this run kept none
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["glyph_average"] == 0.0
    assert "generator_average" not in resumed


def test_runs_from_before_the_video_glyph_average_resume_with_one_decay(tmp_path):
    run(tmp_path, "--iterations", "1", "--frame-warmup", "1", "--snapshot-every", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["config"]["video_glyph_average"] == 0.997  # the default recipe
    del ckpt["config"]["video_glyph_average"]  # as runs before the option wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    run(tmp_path, "--iterations", "2", "--resume")  # their video iterations keep --glyph-average's decay
    resumed = load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["config"]["video_glyph_average"] == 0.0
    assert resumed["config"]["glyph_average"] == 0.995


def test_resume_refuses_a_checkpoint_with_an_averaged_generator(tmp_path, capsys):
    run(tmp_path, "--iterations", "1")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    ckpt["generator_ema"] = ckpt["generator"]  # as runs with the removed --ema-decay wrote them
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--iterations", "2", "--resume")
    assert exit_info.value.code != 0
    assert "holds an average of G's weights (--ema-decay)" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 1  # untouched


def test_generate_and_evaluate_load_a_snapshot_like_a_checkpoint(tmp_path, capsys):
    run(tmp_path / "run", "--iterations", "2", "--snapshot-every", "2")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    snapshot = tmp_path / "run" / "snapshots" / "snapshot_000002.pt"
    assert snapshot.stat().st_size < checkpoint.stat().st_size / 2  # G only: a file to share
    flags = ["--n", "2", "--frames", "4", "--format", "npy", "--no-grid", "--device", "cpu"]
    for name, source in (("snap", snapshot), ("full", checkpoint)):
        assert generate.main(["--checkpoint", str(source), "--out", str(tmp_path / name), *flags]) == 0
    assert "iteration 2 of" in capsys.readouterr().out
    assert generate.main(["--checkpoint", str(snapshot), "--out", str(tmp_path / "raw"), "--raw-weights", *flags]) == 0
    assert "iteration 2 of" in capsys.readouterr().out
    snap, full, raw = (np.load(tmp_path / name / "video_0000.npy") for name in ("snap", "full", "raw"))
    np.testing.assert_array_equal(snap, full)  # the snapshot holds the checkpoint's generator and its average
    assert not np.array_equal(snap, raw)  # the glyph average (the tuned recipe's) draws other glyphs than G's own
    saved = load_checkpoint(snapshot)
    assert set(saved) == {"generator", "generator_average", "iteration", "config"}
    averaged = load_generator(snapshot)[0].state_dict()
    trained = load_generator(snapshot, raw_weights=True)[0].state_dict()
    for key, value in saved["generator"].items():
        torch.testing.assert_close(trained[key], value)
        torch.testing.assert_close(averaged[key], saved["generator_average"].get(key, value))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    evaluate.save_statistics(tmp_path / "real.npz", np.zeros(6), np.eye(6), feature="i3d")
    scores = {}
    for source in (snapshot, checkpoint):
        assert evaluate.main(["fvd", "--checkpoint", str(source), "--i3d", str(tmp_path / "i3d.pt"), "--real-stats",
                              str(tmp_path / "real.npz"), "--n-samples", "4", "--device", "cpu", "--json",
                              "--quiet"]) == 0
        scores[source.name] = json.loads(capsys.readouterr().out)
    assert scores["snapshot_000002.pt"]["iteration"] == 2
    assert scores["snapshot_000002.pt"]["FVD"] == pytest.approx(scores["checkpoint.pt"]["FVD"])


def test_each_train_script_lists_only_the_flags_that_apply_to_it():
    mnist, ucf = train_movingmnist.build_parser().format_help(), train_ucf101.build_parser().format_help()
    video_only = ("--conditional", "--c3d-weights", "--c3d-mean", "--i3d", "--i3d-stats", "--resolution", "--cache")
    assert not [flag for flag in video_only if flag in mnist]
    assert all(flag in ucf for flag in video_only)
    mnist_words, ucf_words = " ".join(mnist.split()), " ".join(ucf.split())
    assert "moving-digit scores" in mnist_words and "IS (with --c3d-weights" in ucf_words  # what --eval-every scores
    assert "--preset {movingmnist}" in mnist and "paper" in ucf
    for flag in ("--config", "--tensorboard", "--snapshot-every", "--resume"):
        assert flag in mnist and flag in ucf
