"""Training recipes: the authors' constants, the content skip, per-clip real offsets, --eval-every."""

import json
import math

import pytest
import torch

import train_movingmnist
import trainer
from models import BN_EPS, Generator, fold_time, model_config, real_pyramid, subsample

FAST = ["--data", "synthetic", "--batch-size", "2", "--workers", "0", "--sample-grid", "2", "--log-every", "1"]


def parse(*argv):
    return trainer.parse_config(train_movingmnist.build_parser(), list(argv))


def test_paper_recipe_is_the_authors_and_flags_override_a_recipe():
    paper = parse("--recipe", "paper")
    assert (paper.amp, paper.lr_g, paper.lr_d, paper.beta1, paper.beta2) == ("none", 1e-4, 1e-4, 0.0, 0.9)
    assert not paper.content_skip and not paper.motion_warp
    assert parse("--recipe", "paper", "--motion-warp").motion_warp
    tuned = parse()
    assert (tuned.recipe, tuned.amp, tuned.content_skip, tuned.motion_warp) == ("tuned", "none", True, True)
    assert not parse("--no-motion-warp").motion_warp
    assert parse("--recipe", "paper", "--lr-g", "3e-4").lr_g == 3e-4
    assert parse().recipe == "tuned"


def test_a_cpu_run_points_to_the_quick_start_only_when_it_is_longer(tmp_path, monkeypatch):
    parser, quick = train_movingmnist.build_parser(), train_movingmnist.CPU_QUICK_START
    assert trainer.longer_than_quick_start(parser, parse(), quick)  # the default: 10000 iterations at batch 32
    assert not trainer.longer_than_quick_start(parser, parse("--batch-size", "8", "--iterations", "7850"), quick)
    assert trainer.longer_than_quick_start(parser, parse("--batch-size", "8", "--iterations", "7851"), quick)
    assert not trainer.longer_than_quick_start(parser, parse(), "")
    # Resumed, only what is left counts: 2150 x 32 clips are more than 7850 x 8, 1950 x 32 are not.
    assert trainer.longer_than_quick_start(parser, parse(), quick, start=7850)
    assert not trainer.longer_than_quick_start(parser, parse(), quick, start=8050)
    passed = []  # the quick start main() hands to train(): printed on a CPU when not empty
    monkeypatch.setattr(trainer, "train", lambda *args: passed.append(args[-1]))
    train_movingmnist.main([*FAST, "--out", str(tmp_path / "short")])  # 10000 iterations at batch 2
    train_movingmnist.main([*FAST, "--out", str(tmp_path / "long"), "--batch-size", "32"])
    monkeypatch.setattr(trainer, "resolve_resume", lambda config: {"iteration": 9000})  # a run 1000 short of its end
    train_movingmnist.main([*FAST, "--out", str(tmp_path / "resumed"), "--batch-size", "32", "--resume", "auto"])
    assert passed == ["", quick, ""]


def test_tuned_r1_weight_keeps_the_authors_weight_times_batch():
    assert parse("--recipe", "paper", "--batch-size", "8").gp_weight == 0.5
    assert parse("--batch-size", "32").gp_weight == 0.5 and parse("--batch-size", "8").gp_weight == 2.0
    assert parse("--batch-size", "8", "--gp-weight", "0.5").gp_weight == 0.5
    assert trainer.TrainConfig(batch_size=16).gp_weight == 1.0


def test_amp_auto_is_fp32_on_a_cpu_and_forced_bf16_there_warns():
    from utils import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none" and resolve_amp("bf16", cpu) == "bf16"
    assert resolve_amp("none", torch.device("cuda")) == "none"
    assert "warning" not in trainer.describe_run(cpu, "none", 1, 8, 10)
    warned = trainer.describe_run(cpu, "bf16", 1, 8, 10).splitlines()
    assert warned[0] == "training on cpu (bf16 autocast, %d CPU threads): 10 iterations at batch 8" % (
        torch.get_num_threads()) and "--amp none" in warned[1]


def test_generator_batchnorm_uses_chainers_epsilon():
    gen = Generator(model_config("movingmnist"))
    eps = {m.eps for m in gen.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {BN_EPS} == {2e-5}


def test_adam_matches_chainers_epsilon_placement():
    """Chainer: lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps); ours sets torch's eps per step."""
    args = parse("--recipe", "paper")
    t = trainer.Trainer(model_config("movingmnist", n_frames=4), args, torch.device("cpu"))
    p = torch.nn.Parameter(torch.tensor([0.5, -2.0, 1e-9]))
    t.opt_g = torch.optim.Adam([p], lr=1e-3, betas=(0.5, 0.9), eps=1.0)
    args.beta2 = 0.9
    ref, m, v = p.detach().clone().double(), 0.0, 0.0
    grads = [torch.tensor([1e-7, 3.0, -2e-8]), torch.tensor([2e-7, -1.0, 1e-8]), torch.tensor([0.0, 0.5, 3e-8])]
    for step, g in enumerate(grads):
        t.set_iteration(step)
        t.opt_g.param_groups[0]["lr"] = 1e-3
        p.grad = g.clone()
        t.opt_g.step()
        g = g.double()
        m = 0.5 * m + 0.5 * g
        v = 0.9 * v + 0.1 * g * g
        k = step + 1
        ref = ref - 1e-3 * math.sqrt(1 - 0.9**k) / (1 - 0.5**k) * m / (v.sqrt() + trainer.CHAINER_ADAM_EPS)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-12)


def test_real_offsets_are_drawn_per_clip():
    x = torch.arange(64 * 8, dtype=torch.float32).view(64, 1, 8, 1, 1).expand(64, 1, 8, 8, 8)
    level2 = real_pyramid(x, [2, 2, 2], [1, 1, 1])[1]  # (64, 1, 4, 4, 4)
    first = level2[:, 0, :, 0, 0] - 8 * torch.arange(64)[:, None]  # frame indices kept per clip
    assert set(first[:, 0].tolist()) == {0.0, 1.0}  # both offsets occur across clips
    assert torch.equal(first - first[:, :1], torch.tensor([0.0, 2.0, 4.0, 6.0]).expand(64, 4))
    one = subsample(x, 2, 1, time_dim=2, offset=1)
    assert torch.equal(one[:, 0, :, 0, 0] - 8 * torch.arange(64)[:, None], torch.tensor([1.0, 3, 5, 7]).expand(64, 4))


def test_content_skip_adds_the_latent_projection_to_every_frame():
    torch.manual_seed(0)
    plain = Generator(model_config("movingmnist", n_frames=4))
    skip = Generator(model_config("movingmnist", n_frames=4, content_skip=True))
    skip.load_state_dict(plain.state_dict())
    z = plain.sample_z(2)
    seen = {}
    for name, gen in (("plain", plain), ("skip", skip)):
        gen.base[0].register_forward_pre_hook(lambda m, inputs, name=name: seen.update({name: inputs[0]}))
        gen.generate(z, 4)
    x0 = plain.fc(z).view(2, 1, 256, 4, 4)
    torch.testing.assert_close(seen["skip"].view(2, 4, 256, 4, 4), seen["plain"].view(2, 4, 256, 4, 4) + x0)


def test_eval_every_adds_digit_scores_to_metrics(tmp_path, monkeypatch):
    import evaluate

    calls = []

    def fake_scores(gen, n_samples, n_frames, seed):
        calls.append((n_samples, n_frames, gen.training))
        return {"identity_consistency": 0.5, "frechet_distance": 12.0}

    monkeypatch.setattr(evaluate, "digit_metrics_for_generator", fake_scores)
    train_movingmnist.main([*FAST, "--out", str(tmp_path), "--iterations", "2", "--eval-every", "2",
                            "--eval-samples", "4"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "identity_consistency" in r]
    assert calls == [(4, 16, True)] and scored == [{"iteration": 2, "identity_consistency": 0.5,
                                                   "frechet_distance": 12.0}]


def test_frame_warmup_comes_with_the_warp_and_needs_it():
    assert parse().frame_warmup == 7500 and parse("--recipe", "paper").frame_warmup == 0
    assert parse("--no-motion-warp").frame_warmup == 0  # unset: no still frames without the warp
    assert parse("--frame-warmup", "0").frame_warmup == 0 and parse("--frame-warmup", "7").frame_warmup == 7
    assert parse("--recipe", "paper", "--motion-warp", "--frame-warmup", "3").frame_warmup == 3


def test_the_frame_warmup_has_its_own_learning_rate_and_the_video_iterations_the_usual_ones():
    assert parse().warmup_lr == 2e-4 and parse("--recipe", "paper").warmup_lr == 0
    assert parse("--warmup-lr", "5e-4").warmup_lr == 5e-4 and parse("--no-motion-warp").warmup_lr == 0  # no warm-up
    config = trainer.TrainConfig(batch_size=2, sync_bn=False, channels_last=False, frame_warmup=2)
    cfg = model_config("movingmnist", n_frames=8, content_skip=True, motion_warp=True)
    trained = trainer.Trainer(cfg, config, torch.device("cpu"))

    def rates(iteration):
        trained.set_iteration(iteration)
        return [opt.param_groups[0]["lr"] for opt in (trained.opt_g, trained.opt_d, trained.opt_frame)]

    assert rates(0) == rates(1) == [2e-4, 1e-4, 2e-4]  # G's still frames and the frame D; video D waits
    assert rates(2) == [1e-4, 1e-4, 1e-4]
    config.warmup_lr = 0.0
    assert rates(0) == [1e-4, 1e-4, 1e-4]


def test_frame_warmup_moves_only_what_draws_still_frames_and_the_lower_heads_then_hands_over():
    torch.manual_seed(0)
    config = trainer.TrainConfig(batch_size=2, sync_bn=False, channels_last=False, frame_warmup=1)
    cfg = model_config("movingmnist", n_frames=8, content_skip=True, motion_warp=True)
    trained = trainer.Trainer(cfg, config, torch.device("cpu"))
    x = torch.rand(2, 1, 8, 64, 64) * 2 - 1
    before = {name: p.detach().clone() for name, p in trained.gen.named_parameters()}
    frame_dis = [p.detach().clone() for p in trained.frame_dis.parameters()]
    video_dis = [p.detach().clone() for p in trained.dis.parameters()]
    trained.set_iteration(0)
    losses = trained.step(x)  # iteration 0 < frame_warmup: still frames only
    assert set(losses) == {"loss_frame_d"} and torch.isfinite(losses["loss_frame_d"])
    moved = {name for name, p in trained.gen.named_parameters() if not torch.equal(p, before[name])}
    still = {name for name, p in trained.gen.named_parameters()
             if any(p is q for q in trained.gen.still_frame_parameters())}
    lower_heads = {name for name, _ in trained.gen.named_parameters() if name.startswith(("renders.0", "renders.1",
                                                                                          "renders.2"))}
    assert moved and moved <= still | lower_heads and not still & lower_heads
    assert {"fc.weight", "renders.3.conv.weight", "content_blocks.0.conv1.weight", "renders.0.conv.weight",
            "renders.2.conv.weight"} <= moved
    assert not any(name.startswith(("flow_head", "clstm", "base")) for name in moved)
    assert all(torch.equal(p, q) for p, q in zip(trained.dis.parameters(), video_dis))
    assert not all(torch.equal(p, q) for p, q in zip(trained.frame_dis.parameters(), frame_dis))
    frame_dis = [p.detach().clone() for p in trained.frame_dis.parameters()]
    trained.set_iteration(1)
    assert set(trained.step(x)) == {"loss_g", "loss_d", "r1", "loss_frame_g", "loss_frame_d"}  # a video update
    assert not all(torch.equal(p, q) for p, q in zip(trained.dis.parameters(), video_dis))
    assert not all(torch.equal(p, q) for p, q in zip(trained.frame_dis.parameters(), frame_dis))  # still judging
    paper = trainer.Trainer(model_config("movingmnist", n_frames=8),
                            trainer.TrainConfig(recipe="paper", batch_size=2, sync_bn=False), torch.device("cpu"))
    assert paper.frame_dis is None and "opt_frame" not in paper.state_dict()


def test_rigid_cells_come_with_the_tuned_recipe_and_the_warp():
    assert parse().rigid_cells == 1 and parse("--recipe", "paper").rigid_cells == 0
    assert parse("--no-motion-warp").rigid_cells == 0  # unset: nothing to carry without the warp
    assert parse("--rigid-cells", "0").rigid_cells == 0 and parse("--rigid-cells", "3").rigid_cells == 3
    config = parse("--rigid-cells", "3", "--batch-size", "2", "--no-sync-bn")
    assert trainer.build_trainer(config, 0, torch.device("cpu"), 0).gen.cfg.rigid_cells == 3  # G samples with it


@pytest.mark.parametrize("name, message", [
    ("still_first_frame", "the still first frame is what rigid cells carry"),
    ("wall_bounce", "the wall bounce folds what rigid cells carry"),
])
def test_rigid_cell_settings_come_with_the_tuned_recipe_and_rigid_cells(name, message, capsys):
    flag = "--" + name.replace("_", "-")
    assert getattr(parse(), name) is True and getattr(parse("--recipe", "paper"), name) is False
    assert getattr(parse("--rigid-cells", "0"), name) is False  # unset: nothing to carry without the cells
    assert getattr(parse("--no-motion-warp"), name) is False
    assert getattr(parse("--no-" + flag[2:]), name) is False
    assert getattr(parse("--recipe", "paper", "--motion-warp", "--rigid-cells", "2", flag), name) is True
    config = parse("--batch-size", "2", "--no-sync-bn")
    assert getattr(trainer.build_trainer(config, 0, torch.device("cpu"), 0).gen.cfg, name)  # G samples with it
    with pytest.raises(SystemExit) as exit_info:
        train_movingmnist.main(["--rigid-cells", "0", flag, *FAST])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {flag}: {message}" in err


def test_glyph_average_comes_with_the_tuned_recipe_and_the_warp():
    assert parse().glyph_average == 0.995 and parse("--recipe", "paper").glyph_average == 0.0
    assert parse("--no-motion-warp").glyph_average == 0.0  # unset: no glyph path without the warp
    assert parse("--glyph-average", "0").glyph_average == 0.0 and parse("--glyph-average", "0.9").glyph_average == 0.9
    paper = trainer.build_trainer(parse("--recipe", "paper", "--batch-size", "2", "--no-sync-bn"), 0,
                                  torch.device("cpu"), 0)
    assert paper.gen_average is None and paper.sampling_generator() is paper.gen
    assert "generator_average" not in paper.state_dict()


def test_video_glyph_average_comes_with_the_tuned_recipe_and_a_glyph_average(capsys):
    assert parse().video_glyph_average == 0.997 and parse("--recipe", "paper").video_glyph_average == 0.0
    assert parse("--no-motion-warp").video_glyph_average == 0.0  # unset: no average to decay
    assert parse("--glyph-average", "0").video_glyph_average == 0.0
    assert parse("--video-glyph-average", "0").video_glyph_average == 0.0  # 0: --glyph-average's decay throughout
    assert parse("--video-glyph-average", "0.9").video_glyph_average == 0.9
    with pytest.raises(SystemExit) as exit_info:
        train_movingmnist.main(["--glyph-average", "0", "--video-glyph-average", "0.9", *FAST])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --video-glyph-average 0.9: a decay of the glyph average, which is off" in err


def test_glyph_average_follows_the_glyph_path_and_samples_with_g_s_motion():
    torch.manual_seed(0)
    config = trainer.TrainConfig(batch_size=2, sync_bn=False, frame_warmup=1, glyph_average=0.75,
                                 video_glyph_average=0.5)
    t = trainer.Trainer(model_config("movingmnist", n_frames=8, motion_warp=True), config, torch.device("cpu"))
    glyph = set(t.gen.glyph_state_keys())
    assert "fc.weight" in glyph and "renders.0.conv.weight" in glyph and "content_blocks.0.bn1.running_mean" in glyph
    assert not any(k.startswith(("clstm", "flow_head")) or k.endswith("num_batches_tracked") for k in glyph)
    x = torch.rand(2, 1, 8, 64, 64) * 2 - 1
    average = {k: v.clone() for k, v in t.gen.state_dict().items()}  # it starts at G's initial weights
    for iteration, decay in enumerate((0.75, 0.5)):  # a still-frame update, then a video update at its own decay
        t.set_iteration(iteration)
        t.step(x)
        state = t.gen.state_dict()
        assert any(not torch.equal(average[k], state[k]) for k in glyph)
        for k in glyph:  # the decay times the average before the step, the rest G's weights after it
            torch.testing.assert_close(t.gen_average.state_dict()[k], average[k] * decay + state[k] * (1 - decay))
        average = {k: v.clone() for k, v in t.gen_average.state_dict().items()}
    sampler = t.sampling_generator().state_dict()
    assert torch.equal(sampler["clstm.input_convs.0.weight"], state["clstm.input_convs.0.weight"])
    assert torch.equal(sampler["flow_head.weight"], state["flow_head.weight"])  # G's motion, as trained ...
    assert not torch.equal(sampler["flow_head.weight"], average["flow_head.weight"])  # ... copied when sampling
    assert not torch.equal(sampler["fc.weight"], state["fc.weight"])  # the glyphs' average
    assert set(t.state_dict()["generator_average"]) == glyph


def test_frame_discriminator_weight_comes_with_the_tuned_recipe():
    assert parse().frame_dis_weight == 0.1 and parse("--recipe", "paper").frame_dis_weight == 0.0
    assert parse("--frame-dis-weight", "0").frame_dis_weight == 0.0
    assert parse("--recipe", "paper", "--frame-dis-weight", "0.5").frame_dis_weight == 0.5


def test_frame_discriminator_deviation_group_comes_with_the_tuned_recipe():
    assert parse().frame_dis_group == 4 and parse("--recipe", "paper").frame_dis_group == 0
    assert parse("--frame-dis-group", "0").frame_dis_group == 0
    t = trainer.Trainer(model_config("movingmnist", n_frames=8, motion_warp=True),
                        trainer.TrainConfig(batch_size=2, sync_bn=False, frame_warmup=1, frame_dis_group=2),
                        torch.device("cpu"))
    assert t.frame_dis.deviation_group == 2


def video_step(frame_dis_weight, motion_warp=True, n_frames=16):
    """One video iteration of a fresh seeded trainer on clips ``x``: (trainer, losses, frame D's inputs, x)."""
    torch.manual_seed(0)
    config = trainer.TrainConfig(batch_size=2, sync_bn=False, channels_last=False, frame_warmup=0,
                                 frame_dis_weight=frame_dis_weight, glyph_average=0.0)
    cfg = model_config("movingmnist", n_frames=n_frames, content_skip=True, motion_warp=motion_warp)
    t = trainer.Trainer(cfg, config, torch.device("cpu"))
    inputs = []
    if t.frame_dis is not None:
        t.frame_dis.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    torch.manual_seed(1)  # the same clips, latents and offsets whether or not a frame D drew its weights
    x = torch.rand(2, 1, n_frames, 64, 64) * 2 - 1
    t.set_iteration(0)
    return t, t.step(x), inputs, x


def test_frame_discriminator_in_video_iterations_adds_to_g_and_updates_itself_after_d():
    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    without, losses_without, _, _ = video_step(0.0)
    assert set(losses_without) == {"loss_g", "loss_d", "r1"} and without.frame_dis is None
    with_frames, losses, inputs, x = video_step(0.25)
    assert set(losses) == {"loss_g", "loss_d", "r1", "loss_frame_g", "loss_frame_d"}
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in losses.values())
    # D sees the same forward passes (made before G's step), so G's update is what the frame loss changes.
    assert same(with_frames.dis, without.dis) and not same(with_frames.gen, without.gen)
    for name in ("loss_g", "loss_d", "r1"):
        assert torch.equal(losses[name], losses_without[name])
    # Three passes: G's loss on the last level's fake frames, then the update on real frames against them.
    fake_for_g, real, fake_for_d = inputs
    assert fake_for_g.shape == real.shape == fake_for_d.shape == (2 * 2, 1, 64, 64)  # 2 clips x 16 / 8 frames
    assert fake_for_g.requires_grad and real.requires_grad and not fake_for_d.requires_grad
    assert torch.equal(fake_for_g.detach(), fake_for_d)
    real_frames = fold_time(x)  # each clip's own frames, in order
    for i, frame in enumerate(real.detach()):
        clip = i // 2
        assert any(torch.equal(frame, f) for f in real_frames[16 * clip:16 * (clip + 1)])


def test_frame_discriminator_needs_no_motion_warp():
    t, losses, _, _ = video_step(0.25, motion_warp=False)
    assert t.frame_dis is not None and "loss_frame_d" in losses and "frame_discriminator" in t.state_dict()


def test_loss_meter_averages_each_loss_over_the_steps_that_returned_it():
    meter = trainer.LossMeter(torch.device("cpu"))
    meter.add({"loss_frame_d": torch.tensor(1.0)})
    meter.add({"loss_frame_d": torch.tensor(3.0)})
    meter.add({"loss_g": torch.tensor(0.5), "loss_d": torch.tensor(1.5), "r1": torch.tensor(0.25)})
    values = meter.read()
    assert values.pop("it_per_s") > 0
    assert values == {"loss_frame_d": 2.0, "loss_g": 0.5, "loss_d": 1.5, "r1": 0.25}
    assert set(meter.read()) == {"it_per_s"}  # read starts anew
