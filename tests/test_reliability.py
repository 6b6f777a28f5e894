"""What survives what: divergence, torn and interrupted saves, full disks, repeated signals, GIF frames, bad input."""

import errno
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import benchmark
import evaluate
import generate
import train_movingmnist
import utils
from test_training import TinyI3D
from utils import (CheckpointWriteError, NonFiniteState, load_checkpoint, nonfinite_entries,
                   previous_checkpoint_path, rejected_checkpoint_path, save_checkpoint, temporary_checkpoint_path,
                   write_video)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = ["--data", "synthetic", "--batch-size", "1", "--workers", "0", "--sample-grid", "1", "--device", "cpu",
        "--log-every", "1", "--sample-every", "1000"]


def train(out, *extra):
    return train_movingmnist.main([*FAST, "--out", str(out), *extra])


def train_fails(capsys, out, *extra) -> str:
    """Run the trainer expecting a bad-input exit; return its only line of stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(out, *extra)
    assert exit_info.value.code == 1
    return one_error_line(capsys.readouterr().err)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def is_finite_checkpoint(path) -> bool:
    state = torch.load(path, weights_only=True)
    return not nonfinite_entries(state)


def poison(path, key="generator") -> None:
    """Rewrite a checkpoint with one NaN weight, as a diverged run without the guard would have saved it."""
    state = torch.load(path, weights_only=True)
    name = next(iter(state[key]))
    state[key][name] = state[key][name].clone().fill_(float("nan"))
    torch.save(state, path)


# ---------------------------------------------------------------------------------------------
# 1. Divergence never replaces a good checkpoint


def test_nonfinite_entries_names_nan_and_inf_anywhere_but_not_large_finite_values():
    state = {"g": {"w": torch.ones(3), "b": torch.tensor([1.0, float("nan")])},
             "opt": {"state": {0: {"exp_avg": torch.tensor([float("-inf")]), "step": torch.tensor(3.0)}}},
             "big": torch.full((1000,), 3e38), "half": torch.ones(4, dtype=torch.bfloat16),
             "ints": torch.arange(3), "rng": [torch.zeros(2, dtype=torch.uint8)], "lr": 1e30}
    assert nonfinite_entries(state) == ["g.b", "opt.state.0.exp_avg"]
    del state["g"]["b"], state["opt"]
    assert nonfinite_entries(state) == []  # 1000 x 3e38 overflows a sum, not the max
    with pytest.raises(NonFiniteState, match="non-finite values in w"):
        save_checkpoint({"w": torch.tensor([float("inf")])}, Path("/nonexistent/never_written.pt"))


def test_diverging_run_keeps_a_finite_checkpoint_and_names_it(tmp_path, capsys):
    # No frame warm-up: a video iteration moves G before D, so iteration 1's checkpoint is still finite.
    line = train_fails(capsys, tmp_path, "--iterations", "8", "--lr-d", "1e30", "--checkpoint-every", "1",
                       "--log-every", "3", "--frame-warmup", "0")
    ckpt = tmp_path / "checkpoint.pt"
    assert "non-finite values" in line and "stopped without saving" in line
    iteration = load_checkpoint(ckpt)["iteration"]
    assert f"The last good checkpoint is {ckpt} (iteration {iteration})" in line
    assert is_finite_checkpoint(ckpt)
    assert not previous_checkpoint_path(ckpt).exists() or is_finite_checkpoint(previous_checkpoint_path(ckpt))


def test_resume_refuses_a_nonfinite_checkpoint_and_keeps_the_good_backup(tmp_path, capsys):
    train(tmp_path, "--iterations", "2", "--checkpoint-every", "1")
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    poison(ckpt)
    with pytest.warns(UserWarning, match="non-finite values in generator.*falling back to .*checkpoint.prev.pt"):
        train(tmp_path, "--iterations", "3", "--checkpoint-every", "1", "--resume")
    # resumed from iteration 1 (the backup), wrote 2 and 3; the backup was never replaced by the bad file
    assert load_checkpoint(ckpt)["iteration"] == 3 and is_finite_checkpoint(ckpt)
    assert torch.load(prev, weights_only=True)["iteration"] == 2 and is_finite_checkpoint(prev)
    assert not is_finite_checkpoint(rejected_checkpoint_path(ckpt))  # kept aside for inspection


# ---------------------------------------------------------------------------------------------
# 2. Falling back keeps the good backup


def test_fallback_from_an_unreadable_checkpoint_keeps_the_good_backup(tmp_path):
    train(tmp_path, "--iterations", "2", "--checkpoint-every", "1")
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a torn file
    with pytest.warns(UserWarning, match="unreadable.*falling back"):
        train(tmp_path, "--iterations", "2", "--resume")  # from iteration 1, then one save at 2
    assert load_checkpoint(ckpt)["iteration"] == 2
    assert torch.load(prev, weights_only=True)["iteration"] == 1  # the good backup, not the torn file
    assert rejected_checkpoint_path(ckpt).stat().st_size < ckpt.stat().st_size  # the torn file, kept aside


def test_a_save_never_rotates_a_torn_file_over_the_backup(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(2)}, path)
    save_checkpoint({"iteration": 2, "w": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes()[:50])
    save_checkpoint({"iteration": 3, "w": torch.ones(2)}, path)
    assert torch.load(previous_checkpoint_path(path), weights_only=True)["iteration"] == 1
    assert load_checkpoint(path)["iteration"] == 3


# ---------------------------------------------------------------------------------------------
# 3. A crash between writing and renaming


@pytest.mark.parametrize("latest_present", [True, False], ids=["after-link", "old-two-rename-scheme"])
def test_crash_between_the_renames_resumes_from_the_newest_complete_checkpoint(tmp_path, latest_present):
    done = tmp_path / "done"
    train(done, "--iterations", "3", "--checkpoint-every", "1")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(done / "config.json", run / "config.json")
    shutil.copy(done / "checkpoint.pt", run / "checkpoint.pt.tmp")  # iteration 3, complete, not yet renamed
    shutil.copy(done / "checkpoint.prev.pt", run / "checkpoint.prev.pt")  # iteration 2
    if latest_present:  # the new save links the current file to the backup name first
        shutil.copy(done / "checkpoint.prev.pt", run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"checkpoint.pt.tmp is a complete checkpoint \(iteration 3\)"):
        train(run, "--iterations", "4", "--checkpoint-every", "1", "--resume")
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 4
    assert torch.load(run / "checkpoint.prev.pt", weights_only=True)["iteration"] == 3  # it was used
    assert not temporary_checkpoint_path(run / "checkpoint.pt").exists()


def test_checkpoint_exists_at_every_instant_of_a_save(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(2)}, path)
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append(path.exists())
        real_replace(src, dst)
        seen.append(path.exists())

    monkeypatch.setattr(utils.os, "replace", watching_replace)
    save_checkpoint({"iteration": 2, "w": torch.ones(2)}, path)
    assert seen and all(seen)


# ---------------------------------------------------------------------------------------------
# 4. A full disk


class FullDiskFile:
    """A file that accepts ``room`` bytes, then fails like a full disk (ENOSPC), leaving a partial file."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_for_checkpoints(monkeypatch, room=4096):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDiskFile(file, room) if str(path).endswith(".tmp") and "w" in mode else file

    monkeypatch.setattr(utils, "open", full_disk_open, raising=False)


def test_full_disk_removes_the_partial_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(1000)}, path)
    fill_disk_for_checkpoints(monkeypatch)
    with pytest.raises(CheckpointWriteError, match="the disk is full") as error:
        save_checkpoint({"iteration": 2, "w": torch.ones(100_000)}, path)
    assert error.value.errno == errno.ENOSPC and f"{path} is intact" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["iteration"] == 1


def test_full_disk_mid_run_is_one_line_and_resume_works_once_space_is_free(tmp_path, monkeypatch, capsys):
    train(tmp_path, "--iterations", "2")
    with monkeypatch.context() as patch:
        fill_disk_for_checkpoints(patch)
        line = train_fails(capsys, tmp_path, "--iterations", "4", "--checkpoint-every", "1", "--resume")
    assert "the disk is full" in line and f"{tmp_path / 'checkpoint.pt'} is intact" in line
    assert not list(tmp_path.glob("*.tmp")) and load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 2
    train(tmp_path, "--iterations", "4", "--checkpoint-every", "1", "--resume")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 4


def failing_metrics(code: int):
    """A stand-in for ``trainer.append_jsonl`` that fails with ``errno`` ``code`` (OSError picks the subclass)."""
    def append(path, record):
        raise OSError(code, os.strerror(code), str(path))
    return append


@pytest.mark.parametrize("code, reason", [(errno.EROFS, "the filesystem is read-only"),  # disk gone read-only
                                          (errno.ENOENT, "No such file or directory")])  # run's files removed
def test_disk_failure_mid_run_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                          code, reason):
    train(tmp_path, "--iterations", "1")
    monkeypatch.setattr("trainer.append_jsonl", failing_metrics(code))
    line = train_fails(capsys, tmp_path, "--iterations", "3", "--resume")
    assert f"metrics.jsonl: {reason}" in line
    assert f"The last good checkpoint is {tmp_path / 'checkpoint.pt'} (iteration 1)" in line


def test_a_failing_run_shuts_its_loader_workers_down(tmp_path, monkeypatch, capsys):
    # Workers ignore SIGTERM (so a signal reaches only the main process); left running, they would
    # block the interpreter's exit forever, and the failed run would hang instead of exiting.
    monkeypatch.setattr("trainer.append_jsonl", failing_metrics(errno.EROFS))
    line = train_fails(capsys, tmp_path, "--iterations", "3", "--workers", "1")
    assert "metrics.jsonl: the filesystem is read-only" in line
    assert multiprocessing.active_children() == []


# ---------------------------------------------------------------------------------------------
# 5, 9. Wrong Moving MNIST arrays and other bad input: one line each, naming the file or flag


@pytest.mark.parametrize("array, expected", [
    (np.zeros((20, 10, 32, 32), np.uint8), "expected a uint8 array (frames, videos, 64, 64)"),
    (np.zeros((20, 0, 64, 64), np.uint8), "holds 0 videos"),
    (np.zeros((20, 10, 64, 64), np.float32), "got float32 (20, 10, 64, 64)"),
    (None, "not a readable .npy array (no NumPy header)"),
])
def test_bad_moving_mnist_files_are_one_line(tmp_path, capsys, array, expected):
    path = tmp_path / "mnist.npy"
    if array is None:
        path.write_text("hello, I am text\n")
    else:
        np.save(path, array)
    line = train_fails(capsys, tmp_path / "run", "--data", str(path), "--iterations", "1")
    assert f"{path}: " in line and expected in line
    if array is not None:
        assert str(tuple(array.shape)) in line


@pytest.mark.parametrize("flags, expected", [
    (["--n-frames", "3"], "--n-frames 3: --subsample-frames 2,2,2 leaves 0 at the last level; expected at least 8"),
    (["--n-frames", "1000"], "--n-frames 1000: Moving MNIST sequences have 20 frames"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--no-motion-warp", "--frame-warmup", "2"], "--frame-warmup 2: still frames need the motion warp"),
    (["--no-motion-warp", "--rigid-cells", "2"], "--rigid-cells 2: rigid cells carry a motion-warp generator's frame 0"),
    (["--no-motion-warp", "--glyph-average", "0.9"], "--glyph-average 0.9: the glyph path exists only in a motion-warp"),
])
def test_bad_training_flags_are_one_line(tmp_path, capsys, flags, expected):
    assert expected in train_fails(capsys, tmp_path, "--iterations", "1", *flags)


@pytest.mark.parametrize("flag, value", [("--lr-g", "-1"), ("--lr-d", "nan"), ("--workers", "-1"),
                                         ("--beta2", "1.5"), ("--gp-weight", "-0.5"),
                                         ("--frame-dis-weight", "-1"), ("--rigid-cells", "-1"),
                                         ("--glyph-average", "1")])
def test_out_of_range_numbers_name_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, "--iterations", "1", flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: argument {flag}: expected" in err


def test_bad_out_folders_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert f"--out {a_file}: a file is there; expected a folder" in train_fails(capsys, a_file, "--iterations", "1")
    below = a_file / "run"
    assert f"--out {below}: {a_file} is a file; expected a folder" in train_fails(capsys, below, "--iterations", "1")
    if Path("/proc/self").exists():
        assert "--out /proc/x: cannot create it: /proc does not accept new folders" in train_fails(
            capsys, "/proc/x", "--iterations", "1")

    def read_only_mkdir(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    line = train_fails(capsys, tmp_path / "new", "--iterations", "1")
    assert f"--out {tmp_path / 'new'}: cannot create it: the filesystem is read-only" in line


# ---------------------------------------------------------------------------------------------
# 7. Corrupt, malicious and misplaced checkpoints


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tganv2_pwned",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A good training checkpoint, a malicious pickle and a corrupt file, each alone in its folder."""
    root = tmp_path_factory.mktemp("ckpts")
    train(root / "good", "--iterations", "1")
    (root / "evil").mkdir()
    torch.save({"generator": Evil()}, root / "evil" / "checkpoint.pt")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "checkpoint.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return root


def test_bad_checkpoints_for_resume_are_one_line(tmp_path, checkpoints, capsys):
    refused = "not a plain-tensor checkpoint, refused by torch.load(weights_only=True)"
    for kind, reason in (("evil", refused), ("corrupt", "unreadable")):
        line = train_fails(capsys, tmp_path, "--iterations", "2", "--resume", str(checkpoints / kind / "checkpoint.pt"))
        assert f"--resume: {checkpoints / kind / 'checkpoint.pt'}: {reason}" in line
        assert "checkpoint.prev.pt: missing; no good checkpoint to load" in line
    both = tmp_path / "both"
    both.mkdir()
    (both / "checkpoint.pt").write_bytes(b"junk")
    (both / "checkpoint.prev.pt").write_bytes(b"more junk")
    line = train_fails(capsys, both, "--iterations", "2", "--resume")
    assert f"--resume: {both / 'checkpoint.pt'}: " in line and "; checkpoint.prev.pt: " in line
    assert line.endswith("no good checkpoint to load")
    line = train_fails(capsys, tmp_path, "--iterations", "2", "--resume", str(checkpoints / "good"))
    assert f"--resume {checkpoints / 'good'}: a folder; expected a checkpoint file" in line
    assert not Path("/tmp/tganv2_pwned").exists()


def test_generate_evaluate_and_benchmark_bad_input_is_one_line(tmp_path, checkpoints, capsys):
    evil = str(checkpoints / "evil" / "checkpoint.pt")
    good = str(checkpoints / "good" / "checkpoint.pt")
    assert generate.main(["--checkpoint", evil, "--out", str(tmp_path / "s")]) == 1
    assert "refused by torch.load" in one_error_line(capsys.readouterr().err)
    assert generate.main(["--checkpoint", good, "--out", str(tmp_path / "s"), "--device", "tpu"]) == 1
    assert "--device tpu: expected" in one_error_line(capsys.readouterr().err)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert generate.main(["--checkpoint", good, "--out", str(a_file), "--device", "cpu", "--n", "1"]) == 1
    assert f"--out {a_file}: a file is there" in one_error_line(capsys.readouterr().err)
    weights, mean = tmp_path / "w.npz", tmp_path / "mean.npz"
    np.savez(weights, x=np.zeros(2))
    np.savez(mean, mean=np.array([{"a": 1}], dtype=object))
    assert evaluate.main(["is", "--checkpoint", evil, "--c3d-weights", str(weights), "--c3d-mean", str(mean)]) == 1
    assert "refused by torch.load" in one_error_line(capsys.readouterr().err)
    stats, i3d = tmp_path / "stats.npz", tmp_path / "i3d.pt"
    np.savez(stats, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        torch.jit.script(TinyI3D()).save(str(i3d))
    assert evaluate.main(["fvd", "--checkpoint", good, "--i3d", str(i3d), "--real-stats", str(stats),
                          "--device", "cpu"]) == 1
    assert f"{stats}: key 'mu' is not a plain numeric array" in one_error_line(capsys.readouterr().err)
    assert evaluate.main(["is", "--checkpoint", good, "--device", "tpu", "--c3d-weights", str(weights),
                          "--c3d-mean", str(mean)]) == 1
    assert "--device tpu" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["speed", "--device", "tpu"])
    assert exit_info.value.code == 1 and "--device tpu" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# 6. GIFs keep every frame


def test_gif_keeps_repeated_frames_and_colours(tmp_path):
    import av

    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 48)
    smooth = np.stack([*np.meshgrid(x, x, indexing="ij"), np.outer(1 - x, x)], axis=-1)  # (48, 48, 3) gradients
    rgb = np.stack([np.roll(smooth, 2 * t, axis=1) for t in range(24)])
    rgb = (rgb * 255).round().astype(np.uint8)
    rgb[7] = rgb[6]  # repeated frames, as an early generator renders them
    rgb[12:15] = rgb[11]
    gray = rng.integers(0, 256, (24, 20, 30, 1), dtype=np.uint8)
    gray[3] = gray[2]
    for name, video in (("rgb.gif", rgb), ("gray.gif", gray)):
        path = write_video(tmp_path / name, video, fps=8)
        read = iio.imread(path, index=None)
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(read) == len(decoded) == 24, name
        read = read if read.ndim == 4 else read[..., None]
        error = np.abs(read[..., : video.shape[-1]].astype(int) - video.astype(int))
        if video.shape[-1] == 1:
            assert error.max() == 0  # grayscale is exact
        else:
            assert error.mean() < 5 and error.max() <= 24  # one shared 256-colour palette of a 3-D gradient
        np.testing.assert_array_equal(read[7 if name == "rgb.gif" else 3], read[6 if name == "rgb.gif" else 2])


def test_failed_video_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(path, frames, fps):
        Path(path).write_bytes(b"GIF89a partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils, "encode_gif", no_space)
    with pytest.raises(OSError):
        write_video(tmp_path / "a.gif", np.zeros((2, 4, 4, 1), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 8. A second signal stops at once, even inside a long step; under torchrun


def test_second_sigterm_during_a_long_step_stops_within_seconds(tmp_path):
    # batch 48 makes the first video step last well over ten seconds on one CPU thread (warm-up steps are quick)
    cmd = [sys.executable, "train_movingmnist.py", *FAST, "--batch-size", "48", "--out", str(tmp_path),
           "--iterations", "5", "--frame-warmup", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "config.json").exists():  # written just before the loop
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 20  # not minutes: os._exit, however busy the machine
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM again: stopping at once" in err
    assert not list(tmp_path.glob("*.tmp"))


STOPPED_MID_SAVE = """
import os, signal, sys, time
from pathlib import Path
from trainer import StopRequest
with StopRequest("intact", Path(sys.argv[1])):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


@pytest.mark.parametrize("complete", [False, True], ids=["torn", "complete"])
def test_a_second_signal_removes_a_torn_temporary_checkpoint_and_keeps_a_complete_one(tmp_path, complete):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(2)}, path)
    tmp = temporary_checkpoint_path(path)
    data = path.read_bytes()
    tmp.write_bytes(data if complete else data[: len(data) // 2])  # a save the second signal cut short, or not
    proc = subprocess.run([sys.executable, "-c", STOPPED_MID_SAVE, str(path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "SIGTERM again: stopping at once" in proc.stderr
    assert tmp.exists() == complete  # a complete one is newer work that --resume installs
    assert load_checkpoint(path)["iteration"] == 1


def torchrun_until_two_logs(out, *extra):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "train_movingmnist.py", *FAST, "--out", str(out), "--iterations", "10000", *extra]
    proc = subprocess.Popen(launch, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    deadline = time.monotonic() + 600  # two processes starting on a busy 2-core machine
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= start + 2):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    return proc


def test_torchrun_sigterm_to_the_workers_exits_zero_and_to_torchrun_still_checkpoints(tmp_path):
    proc = torchrun_until_two_logs(tmp_path)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in workers:
        os.kill(int(pid), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopped after iteration" in err
    reached = load_checkpoint(tmp_path / "checkpoint.pt")["iteration"]
    assert reached >= 2
    # torchrun itself forwards the signal to the ranks (which checkpoint if they can within its 30 s), then
    # re-raises it: exit 1 whatever the ranks do
    proc = torchrun_until_two_logs(tmp_path, "--resume")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "SignalException" in err, (proc.returncode, err[-2000:])
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] >= reached  # never lost
