"""Class-conditional TGANv2: categorical BatchNorm, projection discriminators, labels through the pyramid."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import generate
import train_ucf101
from conftest import CLASSES, R, T
from evaluate import class_accuracy
from models import (CategoricalBatchNorm2d, Generator, MultiLevelDiscriminator, VideoDiscriminator, level_labels,
                    load_weights, model_config, real_pyramid, sample_classes)
from utils import load_checkpoint


def test_categorical_bn_with_one_class_is_plain_bn():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(6)
    torch.nn.init.uniform_(plain.weight, 0.5, 1.5)
    torch.nn.init.uniform_(plain.bias, -0.5, 0.5)
    conditional = CategoricalBatchNorm2d(6, n_classes=1)
    conditional.scale.weight.data[0] = plain.weight.data
    conditional.shift.weight.data[0] = plain.bias.data
    x = torch.randn(10, 6, 5, 5) * 3 + 1
    torch.testing.assert_close(conditional(x, torch.zeros(10, dtype=torch.long)), plain(x))
    torch.testing.assert_close(conditional.norm.running_mean, plain.running_mean)
    fresh = CategoricalBatchNorm2d(6, n_classes=4)
    assert torch.equal(fresh.scale.weight, torch.ones(4, 6)) and torch.equal(fresh.shift.weight, torch.zeros(4, 6))


def test_projection_changes_the_logit_only_through_the_label():
    torch.manual_seed(0)
    dis = VideoDiscriminator(3, [4, 4, 8, 8, 8], n_classes=5)
    x = torch.randn(3, 3, 4, 16, 16)
    labels_a, labels_b = torch.tensor([0, 1, 2]), torch.tensor([4, 1, 3])
    features = dis.features(x)
    unconditional = dis.linear(features).squeeze(1)
    for labels in (labels_a, labels_b):
        projection = (dis.embed(labels) * features).sum(1)
        torch.testing.assert_close(dis(x, labels), unconditional + projection)
    difference = dis(x, labels_a) - dis(x, labels_b)
    assert difference[1] == 0 and difference[0] != 0 and difference[2] != 0  # same label, same logit
    with pytest.raises(ValueError, match="labels must be given"):
        dis(x)


def test_labels_follow_the_batch_strides():
    labels = torch.arange(8)
    assert [v.tolist() for v in level_labels(labels, [2, 1, 2])] == [list(range(8)), [0, 2, 4, 6], [0, 2, 4, 6],
                                                                       [0, 4]]
    torch.manual_seed(0)
    cfg = model_config("movingmnist", n_frames=8, subsample_batch=[2, 1, 2], n_classes=3)
    gen, dis = Generator(cfg), MultiLevelDiscriminator(cfg)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    renders = gen(gen.sample_z(8), labels=y)
    per_level = level_labels(y, cfg.subsample_batch)
    assert [r.shape[0] for r in renders] == [len(v) for v in per_level] == [8, 4, 4, 2]
    assert dis(renders, per_level).shape == (18,)
    _, real_labels = real_pyramid(torch.zeros(8, 1, 8, 64, 64), cfg.subsample_frames, cfg.subsample_batch, y)
    assert [v.tolist() for v in real_labels] == [v.tolist() for v in per_level]
    # a render of level 2 belongs to the sample its label says: generating that sample alone at level 2 matches
    gen.eval()
    z = gen.sample_z(2)
    both = gen.generate(z, 8, level=2, labels=torch.tensor([0, 2]))
    alone = gen.generate(z[1:], 8, level=2, labels=torch.tensor([2]))
    torch.testing.assert_close(both[1:], alone)
    with pytest.raises(ValueError, match="conditional"):
        gen.generate(z)


def test_conditional_and_unconditional_checkpoints_do_not_mix():
    cond = Generator(model_config("movingmnist", n_classes=3))
    plain = Generator(model_config("movingmnist"))
    with pytest.raises(ValueError, match="cannot load a conditional generator checkpoint into an unconditional model"):
        load_weights(plain, cond.state_dict(), "generator")
    with pytest.raises(ValueError, match="unconditional generator checkpoint into a conditional model"):
        load_weights(cond, plain.state_dict(), "generator")
    with pytest.raises(ValueError, match="embed|scale|shape"):
        load_weights(cond, Generator(model_config("movingmnist", n_classes=4)).state_dict(), "generator")


def test_uniform_classes_and_accuracy():
    gen = Generator(model_config("movingmnist", n_classes=4))
    labels = sample_classes(gen, 4000, torch.Generator().manual_seed(0))
    assert np.bincount(labels.numpy(), minlength=4).min() > 900
    assert sample_classes(gen, 5, class_id=2).tolist() == [2] * 5
    assert sample_classes(Generator(model_config("movingmnist")), 5) is None
    probs = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    result = class_accuracy(probs, np.array([0, 1, 2, 0, 0, 3]), 4)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["class_accuracy"] == [pytest.approx(2 / 3), 1.0, 1.0, 0.0]


def test_conditional_run_writes_class_rows_then_generate_by_name(tmp_path, tree, small_rgb_preset, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ucf101.main(["--data", str(tree), "--preset", small_rgb_preset, "--resolution", str(R), "--batch-size",
                           "2", "--iterations", "2", "--sample-grid", "3", "--workers", "0", "--device", "cpu",
                           "--conditional", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    frames = iio.imread(out / "samples" / "iter_000002.gif", index=None)
    assert frames.shape[:3] == (T, 3 * (R + 1) + 1, 3 * (R + 1) + 1)  # 3 rows (classes) of 3 videos
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["classes"] == CLASSES and ckpt["config"]["conditional"] is True
    assert ckpt["config"]["model"]["n_classes"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == CLASSES

    with pytest.raises(SystemExit):  # resuming it as an unconditional run is refused
        train_ucf101.main(["--data", str(tree), "--preset", small_rgb_preset, "--resolution", str(R),
                           "--iterations", "3", "--resume", "--out", str(out)])
    assert "holds a conditional model (3 classes); pass --conditional" in capsys.readouterr().err

    videos = tmp_path / "videos"
    assert generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--class", "yoyo", "--n", "2", "--frames", "4",
                          "--out", str(videos), "--device", "cpu"]) == 0
    assert "class YoYo" in capsys.readouterr().out
    assert iio.imread(videos / "video_0001.gif", index=None).shape[:3] == (4, R, R)
    assert generate.main(["--checkpoint", str(out / "checkpoint.pt"), "--class", "Surfing", "--out", str(videos)]) == 1
    assert "not a class of this checkpoint" in capsys.readouterr().err


def test_class_needs_a_conditional_checkpoint(tmp_path, capsys):
    from utils import save_checkpoint

    cfg = model_config("movingmnist")
    save_checkpoint({"generator": Generator(cfg).state_dict(), "config": {"model": cfg.to_dict()}, "iteration": 0},
                    tmp_path / "c.pt")
    assert generate.main(["--checkpoint", str(tmp_path / "c.pt"), "--class", "3", "--out", str(tmp_path)]) == 1
    assert "unconditional" in capsys.readouterr().err
