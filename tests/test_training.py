"""The shared training loop end to end, through ``train_movingmnist.py``."""

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import train_movingmnist
import trainer
from datasets import MovingDigits
from utils import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "synthetic", "--batch-size", "2", "--workers", "0", "--sample-grid", "2", "--log-every", "1",
        "--frame-warmup", "1"]  # one still-frame iteration, then video iterations


def run(out, *extra):
    return train_movingmnist.main([*FAST, "--out", str(out), *extra])


def test_three_iterations_write_gif_checkpoint_config_and_metrics(tmp_path):
    last = run(tmp_path, "--iterations", "3", "--sample-every", "2")
    assert set(last) >= {"loss_g", "loss_d", "r1", "it_per_s"}
    gifs = sorted(p.name for p in (tmp_path / "samples").glob("*.gif"))
    assert gifs == ["iter_000002.gif", "iter_000003.gif"]
    frames = iio.imread(tmp_path / "samples" / "iter_000003.gif", index=None)
    assert frames.shape[:3] == (16, 2 * 65 + 1, 2 * 65 + 1)  # 16 frames, 2x2 grid of 64 px + borders
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["iteration"] == 3
    assert {"generator", "discriminator", "opt_g", "opt_d", "rng", "config"} <= set(ckpt)
    config = json.loads((tmp_path / "config.json").read_text())
    # gp_weight: the tuned recipe's R1 weight at batch 2, 16 / 2
    assert config["batch_size"] == 2 and config["model"]["clstm_ch"] == 256 and config["gp_weight"] == 8.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert "loss_d" not in metrics[0] and np.isfinite(metrics[0]["loss_frame_d"])  # the frame warm-up
    # Video iterations: the video discriminators' losses and the frame discriminator's, which stays on.
    assert all(np.isfinite([m["loss_d"], m["loss_frame_g"], m["loss_frame_d"]]).all() for m in metrics[1:])


def test_speed_and_time_to_finish_are_told_once_per_phase(tmp_path, capsys):
    run(tmp_path, "--iterations", "4", "--frame-warmup", "2")
    told = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed ")]
    assert len(told) == 2
    assert "it/s: the remaining 0 frame warm-up iterations (then slower video ones) take about 0:00:00" in told[0]
    assert "it/s: the remaining 0 iterations take about 0:00:00" in told[1]


def test_resume_is_exact(tmp_path):
    # Split inside the frame warm-up (iterations 1-3), so the resumed run finishes it and then takes a video step.
    run(tmp_path / "straight", "--iterations", "4", "--seed", "5", "--frame-warmup", "3")
    run(tmp_path / "split", "--iterations", "2", "--seed", "5", "--frame-warmup", "3")
    run(tmp_path / "split", "--iterations", "4", "--resume")
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 4
    assert not torch.equal(a["generator_average"]["fc.weight"], a["generator"]["fc.weight"])  # the tuned recipe's
    for key in ("generator", "generator_average", "discriminator", "frame_discriminator"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for key in ("opt_d", "opt_frame"):
        for name, tensor in a[key]["state"][0].items():
            assert torch.equal(tensor, b[key]["state"][0][name])


def test_missing_and_malformed_data_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_movingmnist.main(["--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 1
    assert "missing.npy: Moving MNIST file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((20, 3, 64), np.uint8))
    with pytest.raises(SystemExit):
        train_movingmnist.main(["--data", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "bad.npy: expected a uint8 array" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        train_movingmnist.main(["--subsample-frames", "2,x", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2  # argparse usage error
    with pytest.raises(SystemExit):
        train_movingmnist.main([*FAST, "--out", str(tmp_path / "r"), "--resume"])
    assert "checkpoint" in capsys.readouterr().err


class PoisonedDigits(MovingDigits):
    """Procedural digits whose clips turn to NaN after ``clean`` reads."""

    def __init__(self, clean):
        super().__init__(n_frames=16)
        self.reads, self.clean = 0, clean

    def __getitem__(self, key):
        self.reads += 1
        clip = super().__getitem__(key)
        return clip if self.reads <= self.clean else clip * float("nan")  # float NaNs: the trainer passes them on


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    poisoned = PoisonedDigits(clean=8)  # batch 2: iterations 1-4 clean, 5 poisoned
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(train_movingmnist.build_parser(), lambda config: (poisoned, "poisoned"),
                     train_movingmnist.genSamples,
                     [*FAST, "--out", str(tmp_path), "--iterations", "8", "--checkpoint-every", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 5" in err
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["generator"].values() if t.is_floating_point())


def test_main_command_help_and_cli(tmp_path):
    out = subprocess.run([sys.executable, "train_movingmnist.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--data", "--out", "--iterations", "--batch-size", "--n-frames", "--lr-g", "--lr-d", "--gp-weight",
                 "--subsample-frames", "--subsample-batch", "--sample-every", "--checkpoint-every", "--resume",
                 "--seed", "--device", "--amp", "--workers"):
        assert flag in out.stdout


class TinyI3D(torch.nn.Module):
    """A TorchScript-able stand-in for I3D: (N, 3, T, H, W) -> (N, 6) features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3, 4)))


def test_eval_every_adds_fvd_to_the_metrics(tmp_path):
    import warnings

    from evaluate import save_statistics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    save_statistics(tmp_path / "real.npz", np.zeros(6), np.eye(6), feature="i3d")
    # IS / FVD flags belong to train_ucf101.py; its parser on Moving MNIST data keeps this test fast.
    parser = trainer.build_parser(train_movingmnist.DESCRIPTION, {**train_movingmnist.DEFAULTS, "eval_metric": "video"},
                                  prog="test", conditional=False, video_metrics=True)

    def run(out, *extra):
        return trainer.main(parser, train_movingmnist.open_dataset, train_movingmnist.genSamples,
                            [*FAST, "--out", str(out), *extra])

    run(tmp_path / "run", "--iterations", "2", "--eval-every", "1", "--eval-samples", "3", "--i3d",
        str(tmp_path / "i3d.pt"), "--i3d-stats", str(tmp_path / "real.npz"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fvd = [r for r in records if "FVD" in r]
    assert [r["iteration"] for r in fvd] == [1, 2] and all(np.isfinite(r["FVD"]) and r["FVD"] > 0 for r in fvd)
    with pytest.raises(SystemExit):
        run(tmp_path / "bad", "--iterations", "1", "--eval-every", "1")  # nothing to evaluate with


@pytest.mark.parametrize("flags", [["--no-channels-last"], ["--channels-last"]])
def test_both_memory_formats_train(tmp_path, flags):
    last = run(tmp_path, "--iterations", "2", *flags)
    assert np.isfinite(last["loss_g"]) and np.isfinite(last["loss_d"]) and np.isfinite(last["r1"])


def test_bf16_autocasts_the_networks_and_keeps_the_losses_fp32():
    """The bf16 path's plumbing; a CPU step itself is not checked: oneDNN's bf16 gradients can be NaN there."""
    from models import model_config
    from utils import generator_loss

    config = trainer.TrainConfig(amp="bf16", iterations=1, sync_bn=False)
    cfg = model_config("movingmnist", n_frames=8, content_skip=True, motion_warp=True)  # the default recipe's
    t = trainer.Trainer(cfg, config, torch.device("cpu"))
    assert t.amp == "bf16"
    with t.autocast():
        renders = t.gen(t.gen.sample_z(2))
        logits = t.dis(renders, [None] * len(renders))
        frame_logits = t.frame_dis(t.gen.still_frame(t.gen.sample_z(2)))
    assert {x.dtype for x in renders} == {logits.dtype, frame_logits.dtype} == {torch.bfloat16}
    assert generator_loss(logits).dtype == torch.float32


def test_channels_last_computes_the_same_step():
    from models import model_config

    def gradients(channels_last):
        config = trainer.TrainConfig(recipe="paper", iterations=1, sync_bn=False, channels_last=channels_last)
        torch.manual_seed(0)
        t = trainer.Trainer(model_config("movingmnist", n_frames=8), config, torch.device("cpu"))
        torch.manual_seed(1)
        t.step(torch.rand(2, 1, 8, 64, 64) * 2 - 1)
        return [p.grad.clone() for p in list(t.gen.parameters()) + list(t.dis.parameters())]

    for a, b in zip(gradients(False), gradients(True)):
        assert (a - b).norm() <= 1e-3 * a.norm() + 1e-7


def test_compile_with_channels_last_on_cuda_is_a_clear_error():
    """Refused before any network is built, so it is checked here without a GPU."""
    from models import model_config

    config = trainer.TrainConfig(iterations=1, sync_bn=False, compile=True, channels_last=True)
    with pytest.raises(ValueError, match="--no-channels-last"):
        trainer.Trainer(model_config("movingmnist", n_frames=8), config, torch.device("cuda"))
