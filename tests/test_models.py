"""Shapes and maths of the networks (docs/METHOD.md, 'Generator' and 'Discriminators')."""

import math

import pytest
import torch

from models import (ConvLSTM, FrameDiscriminator, Generator, MultiLevelDiscriminator, bounce_off_walls, build_models,
                    cell_displacements, count_parameters, downsample_video, fold_time, minibatch_deviation,
                    model_config, subsample, unfold_time, warp)


def expected_shapes(cfg, n, frame_strides, batch_strides):
    shapes, t = [], cfg.n_frames
    for level, res in enumerate(cfg.resolutions):
        if level > 0:
            t //= frame_strides[level - 1]
            n = math.ceil(n / batch_strides[level - 1])
        shapes.append((n, cfg.out_channels, t, res, res))
    return shapes


@pytest.mark.parametrize("preset", ["movingmnist", "paper"])
@pytest.mark.parametrize("batch_strides", [[1, 1, 1], [2, 2, 2]])
@pytest.mark.parametrize("motion_warp", [False, True])
def test_training_naive_and_dense_shapes(preset, batch_strides, motion_warp):
    cfg = model_config(preset, subsample_batch=batch_strides, motion_warp=motion_warp)
    with torch.device("meta"):  # the paper preset is large: shapes only, no memory or compute
        gen, dis = build_models(cfg)
        z = torch.empty(8, cfg.z_dim)
        renders = gen(z)
        assert [tuple(x.shape) for x in renders] == expected_shapes(cfg, 8, cfg.subsample_frames, batch_strides)
        assert dis(renders).shape == (sum(x.shape[0] for x in renders),)
        naive = gen.naive(z)
        assert [tuple(x.shape) for x in naive] == expected_shapes(cfg, 8, [1, 1, 1], [1, 1, 1])
        gen.eval()
        for level, res in enumerate(cfg.resolutions, start=1):
            assert gen.generate(z, n_frames=24, level=level).shape == (8, cfg.out_channels, 24, res, res)


def test_preset_resolutions_and_parameter_counts():
    assert model_config("movingmnist").resolutions == [8, 16, 32, 64]
    assert model_config("paper").resolutions == [24, 48, 96, 192]
    assert model_config("paper", resolution=64).t_size == 1
    assert model_config("paper", resolution=128).resolutions[-1] == 128
    with pytest.raises(ValueError, match="multiple of 64"):
        model_config("paper", resolution=100)
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("nope")
    with pytest.raises(ValueError, match="one per level"):
        model_config("movingmnist", subsample_frames=[2, 2])
    with torch.device("meta"):
        g, d = build_models(model_config("movingmnist"))
        assert (count_parameters(g), count_parameters(d)) == (6_420_420, 7_485_060)
        assert count_parameters(build_models(model_config("movingmnist", motion_warp=True))[0]) == 6_899_014
        g, d = build_models(model_config("paper"))
        assert (count_parameters(g), count_parameters(d)) == (88_032_460, 116_077_060)


def test_dense_generation_renders_every_frame_cpu():
    torch.manual_seed(0)
    gen = Generator(model_config("movingmnist")).eval()
    with torch.no_grad():
        video = gen.generate(gen.sample_z(2), n_frames=20)
    assert video.shape == (2, 1, 20, 64, 64)
    assert video.abs().max() <= 1
    assert (video[:, :, 1:] - video[:, :, :-1]).abs().sum() > 0  # frames differ over time


def test_subsample_offsets_are_random_lengths_fixed():
    x = torch.arange(16).view(1, 16).expand(6, 16).clone()  # (N=6, T=16), value = frame index
    x[:, :] += torch.arange(6).view(6, 1) * 100  # and sample index * 100
    offsets = set()
    for seed in range(40):
        torch.manual_seed(seed)
        y = subsample(x, subsample_frames=3, subsample_batch=2, time_dim=1)
        assert y.shape == (3, 5)  # floor(16 / 3) frames, ceil(6 / 2) samples
        offset = int(y[0, 0])
        offsets.add(offset)
        assert y[0].tolist() == [offset + 3 * k for k in range(5)]
        assert (y[:, 0] // 100).tolist() == [0, 2, 4]
    assert offsets == {0, 1, 2}


def test_convlstm_skips_only_zero_work():
    """The bias-only shortcut equals a ConvLSTM that convolves its zero inputs and zero state."""
    torch.manual_seed(0)
    lstm = ConvLSTM(8, n_layers=2)
    for conv in lstm.input_convs:
        torch.nn.init.uniform_(conv.bias, -0.5, 0.5)
    x0 = torch.randn(3, 8, 4, 4)
    ours = lstm(x0, 5)

    h = [torch.zeros_like(x0) for _ in range(2)]
    c = [torch.zeros_like(x0) for _ in range(2)]
    reference = []
    for step in range(5):
        inp = x0 if step == 0 else torch.zeros_like(x0)
        for layer in range(2):
            gates = lstm.input_convs[layer](inp) + lstm.state_convs[layer](h[layer])
            i, f, o, g = gates.chunk(4, 1)
            c[layer] = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
            h[layer] = torch.sigmoid(o) * torch.tanh(c[layer])
            inp = h[layer]
        reference.append(h[-1])
    torch.testing.assert_close(ours, torch.stack(reference, 1))


def test_downsample_follows_the_original_padding_rule():
    x = torch.ones(1, 1, 1, 3, 4)
    y = downsample_video(x)
    # T: 1 -> padded to 3, window 1 -> 3; H: 3 -> padded to 5, window 2 -> 2; W: 4 -> 2
    assert y.shape == (1, 1, 3, 2, 2)
    assert y[0, 0, 0].abs().sum() == 0 and y[0, 0, 2].abs().sum() == 0  # padded frames are zero
    # H window [pad, row0] averages a zero with a one; W is unpadded
    torch.testing.assert_close(y[0, 0, 1], torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    assert downsample_video(torch.ones(2, 3, 4, 6, 8)).shape == (2, 3, 2, 3, 4)


def test_discriminator_levels_are_independent_and_concatenated():
    torch.manual_seed(0)
    cfg = model_config("movingmnist")
    dis = MultiLevelDiscriminator(cfg)
    videos = [torch.randn(2, 1, t, r, r) for t, r in zip([16, 8, 4, 2], cfg.resolutions)]
    y = dis(videos)
    assert y.shape == (8,)
    torch.testing.assert_close(y[2:4], dis.levels[1](videos[1]))
    with pytest.raises(ValueError, match="expected 4 levels"):
        dis(videos[:3])


def test_initialisation_is_glorot_with_the_right_gains():
    torch.manual_seed(0)
    gen = Generator(model_config("movingmnist"))
    block = gen.level_blocks[0]
    for conv, gain in ((block.conv1, math.sqrt(2)), (block.shortcut, 1.0)):
        fan_in = conv.weight[0].numel()
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.9 * bound
        assert conv.bias.abs().sum() == 0


def test_generator_gradients_reach_every_level():
    torch.manual_seed(0)
    cfg = model_config("movingmnist", n_frames=8)
    gen = Generator(cfg)
    renders = gen(gen.sample_z(2))
    sum(x.mean() for x in renders).backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None]
    assert missing == []


def test_bf16_cpu_conv3d_on_two_frames_has_the_right_weight_gradient():
    """oneDNN's bf16 CPU kernel gets depth-2 weight gradients wrong; Conv3x3x3 works around it."""
    from models import Conv3x3x3

    torch.manual_seed(0)
    conv = Conv3x3x3(8, 8)
    x = torch.randn(2, 8, 2, 8, 8)
    grads = {}
    for amp in (False, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(x)
        y.float().pow(2).sum().backward()
        grads[amp] = conv.weight.grad.clone()
    assert torch.isfinite(grads[True]).all()
    assert (grads[True] - grads[False]).norm() / grads[False].norm() < 0.02


def test_warp_moves_content_by_whole_pixels_and_keeps_it_with_zero_flow():
    content = torch.zeros(1, 1, 8, 8)
    content[0, 0, 3, 3] = 1.0
    flow = torch.zeros(1, 3, 2, 4, 4)  # three frames; a coarse field, resized to 8x8
    flow[0, 1, 0] = 2 / 8  # frame 1 reads one pixel to the right: the dot moves one pixel left
    flow[0, 2, 1] = -4 / 8  # frame 2 reads two pixels up: the dot moves two pixels down
    frames = warp(content, flow)
    assert frames.shape == (3, 1, 8, 8)
    assert torch.equal(frames[0], content[0])
    assert frames[1, 0].nonzero().tolist() == [[3, 2]]
    assert frames[2, 0].nonzero().tolist() == [[5, 3]]
    torch.testing.assert_close(frames.sum((1, 2, 3)), torch.ones(3))


def test_motion_warp_starts_static_and_learns_a_flow():
    torch.manual_seed(0)
    cfg = model_config("movingmnist", n_frames=8, content_skip=True, motion_warp=True)
    gen = Generator(cfg)
    z = gen.sample_z(2)
    gen.eval()
    with torch.no_grad():
        video = gen.generate(z)
    assert video.shape == (2, 1, 8, 64, 64)
    # The flow head starts at zero, so every frame is the content map rendered as is.
    torch.testing.assert_close(video, video[:, :, :1].expand_as(video), rtol=0, atol=1e-6)
    gen.train()
    renders = gen(z, subsample_batch=[1, 2, 1])
    assert [tuple(x.shape) for x in renders] == expected_shapes(cfg, 2, cfg.subsample_frames, [1, 2, 1])
    sum(x.mean() for x in renders).backward()
    assert [n for n, p in gen.named_parameters() if p.grad is None] == []
    assert gen.flow_head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a uniform flow moves the frames: dense generation follows it
        gen.flow_head.bias.copy_(torch.tensor([0.25, 0.0]))
        gen.eval()
        shifted = gen.generate(z)
    content, flow = gen.content_and_flow(z, 8)
    assert flow.shape == (2, 8, 2, 8, 8) and content.shape == (2, 128, 8, 8)
    assert not torch.allclose(shifted, video, atol=1e-3)


def test_cell_displacements_follow_the_ink_from_frame_0():
    flow = torch.zeros(1, 2, 2, 8, 8)
    flow[0, :, 0] = 0.3  # a lens shared by both frames: no motion
    flow[0, 1, 0, :, :4] += 0.5  # frame 1: the left half moves along x, the right half along y
    flow[0, 1, 1, :, 4:] -= 0.25
    frames = -torch.ones(1, 1, 2, 64, 64)
    frames[0, 0, 1, 8:16, 8:16] = 1.0  # frame 1's ink: one 8x8 block of the top-left cell
    moved = cell_displacements(flow, frames, 2)
    assert moved.shape == (1, 2, 2, 2, 2)
    assert torch.equal(moved[0, 0], torch.zeros(2, 2, 2))  # frame 0 has not moved
    torch.testing.assert_close(moved[0, 1, 0], torch.tensor([[0.5, 0.0], [0.5, 0.0]]))  # x: left cells only
    torch.testing.assert_close(moved[0, 1, 1], torch.tensor([[0.0, -0.25], [0.0, -0.25]]))  # y: right cells only
    # One cell for the whole frame: the inked block (weight 1.01) outweighs the other 63 blocks (0.01 each).
    whole = cell_displacements(flow, frames, 1)[0, 1, :, 0, 0]
    total = 1.01 + 63 * 0.01
    torch.testing.assert_close(whole, torch.tensor([0.5 * (1.01 + 31 * 0.01) / total, -0.25 * 32 * 0.01 / total]))


def test_rigid_cells_keep_frame_0_and_a_uniform_motion_and_carry_frame_0_otherwise(monkeypatch):
    torch.manual_seed(0)
    cfg = model_config("movingmnist", n_frames=4, content_skip=True, motion_warp=True)
    gen = Generator(cfg).eval()
    rigid = Generator(model_config("movingmnist", n_frames=4, content_skip=True, motion_warp=True, rigid_cells=2))
    with torch.no_grad():
        gen.flow_head.weight.normal_(0, 0.05)  # a flow that bends the map: no frame is a moved frame 0
    rigid.load_state_dict(gen.state_dict())
    rigid.eval()
    z = gen.sample_z(2)
    with torch.no_grad():
        free, carried = gen.generate(z), rigid.generate(z)
        torch.testing.assert_close(carried[:, :, 0], free[:, :, 0], rtol=0, atol=1e-6)
        assert (carried[:, :, 1:] - free[:, :, 1:]).abs().max() > 1e-2
        # Frame 0's glyphs move: its map, carried by the cells' displacements, is every later frame.
        content, flow = gen.content_and_flow(z, 4)
        for block in gen.level_blocks:
            content = block(content)
        first = warp(content, flow[:, :1])
        moved = cell_displacements(flow, free, 2)
        torch.testing.assert_close(carried, gen._render_warped(3, first, moved, None), rtol=0, atol=1e-6)
        # A flow that moves the whole map by whole pixels is rigid already: both ways draw the same frames.
        step = torch.tensor([2 / 64, -4 / 64]).view(1, 1, 2, 1, 1)  # one pixel left, two down per frame
        uniform = step * torch.arange(4.0).view(1, 4, 1, 1, 1) * torch.ones(2, 4, 2, 8, 8)
        for g in (gen, rigid):
            monkeypatch.setattr(g, "content_and_flow", lambda z, n, labels=None, g=g: (
                Generator.content_and_flow(g, z, n, labels)[0], uniform))
        torch.testing.assert_close(rigid.generate(z), gen.generate(z), rtol=0, atol=1e-5)


def test_still_first_frame_carries_the_unmoved_map_and_needs_rigid_cells():
    torch.manual_seed(0)
    kwargs = dict(n_frames=4, content_skip=True, motion_warp=True, rigid_cells=2)
    gen = Generator(model_config("movingmnist", **kwargs))
    still = Generator(model_config("movingmnist", still_first_frame=True, **kwargs))
    with torch.no_grad():
        gen.flow_head.weight.normal_(0, 0.05)  # frame 0's own flow moves the map
    still.load_state_dict(gen.state_dict())
    gen.eval(), still.eval()
    z = gen.sample_z(2)
    with torch.no_grad():
        from_flow, from_still = gen.generate(z), still.generate(z)
        torch.testing.assert_close(from_still[:, :, 0], still.still_frame(z), rtol=0, atol=1e-6)
        assert (from_flow[:, :, 0] - from_still[:, :, 0]).abs().max() > 1e-2
        # The later frames carry the unmoved map by the same cells' displacements (read from the flow's frames).
        content, flow = gen.content_and_flow(z, 4)
        for block in gen.level_blocks:
            content = block(content)
        free = gen._render_warped(3, content, flow, None)
        moved = cell_displacements(flow, free, 2)
        torch.testing.assert_close(from_still, gen._render_warped(3, content, moved, None), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--still-first-frame needs rigid cells"):
        model_config("movingmnist", motion_warp=True, still_first_frame=True)


def test_bounce_off_walls_reflects_shifts_that_would_take_the_ink_out_of_the_frame():
    first = -torch.ones(3, 1, 64, 64)
    first[0, :, 20:30, 10:20] = 1.0  # ink in columns 10..19 and rows 20..29: it may move 10 px left, 44 right
    first[1, :, :, 30:34] = 1.0  # a bar from the top to the bottom wall: its rows span the frame
    # clip 2 has no ink
    px = torch.tensor([0.0, 5.0, 44.0, 50.0, -12.0, 100.0])  # shifts in pixels, frame by frame
    moves = torch.zeros(3, 6, 2, 2, 2)
    moves[:, :, 0] = (-px * 2 / 64).view(1, 6, 1, 1)  # warp's units: the map moves by -d * 32 px
    moves[:, :, 1] = (px * 2 / 64).view(1, 6, 1, 1)  # and the other way along y
    bounced = bounce_off_walls(moves, first)
    assert bounced.shape == moves.shape and bounced.dtype == moves.dtype
    x = -bounced[0, :, 0, 0, 0] * 32
    # Inside the range a shift is kept; past the right wall (44) it comes back; past the left (-10) too.
    torch.testing.assert_close(x, torch.tensor([0.0, 5.0, 44.0, 38.0, -8.0, -8.0]))
    y = -bounced[0, :, 1, 1, 1] * 32  # rows 20..29: -20 to 34
    torch.testing.assert_close(y, torch.tensor([0.0, -5.0, 4.0, 10.0, 12.0, 8.0]))
    assert torch.equal(bounced[0, :, :, 0, 0], bounced[0, :, :, 1, 1])  # every cell of a clip shares the range
    torch.testing.assert_close(bounced[1, :, 1], moves[1, :, 1])  # the bar's rows span the frame: y kept
    torch.testing.assert_close(-bounced[1, :, 0, 0, 0] * 32, torch.tensor([0.0, 5.0, 16.0, 10.0, -12.0, -20.0]))
    torch.testing.assert_close(bounced[2, :4], moves[2, :4])  # no ink: shifts under a frame's width are kept


class BoxedHead(torch.nn.Module):
    """A render head whose frames are black outside their central 16 x 16 pixels."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.register_buffer("box", torch.zeros(64, 64, dtype=torch.bool))
        self.box[24:40, 24:40] = True

    def forward(self, x, labels=None):
        return torch.where(self.box, self.head(x, labels), -1.0)


def test_wall_bounce_folds_what_rigid_cells_carry_and_needs_them():
    torch.manual_seed(0)
    kwargs = dict(n_frames=4, content_skip=True, motion_warp=True, rigid_cells=2, still_first_frame=True)
    gen = Generator(model_config("movingmnist", **kwargs))
    bouncing = Generator(model_config("movingmnist", wall_bounce=True, **kwargs))
    with torch.no_grad():
        gen.flow_head.weight.normal_(0, 0.5)  # a flow that carries the glyphs far
    bouncing.load_state_dict(gen.state_dict())
    gen.eval(), bouncing.eval()
    for g in (gen, bouncing):  # frames drawn in a box of 16 px, black around it: ink that can reach a wall
        g.renders[3] = BoxedHead(g.renders[3])
    z = gen.sample_z(2)
    with torch.no_grad():
        carried, bounced = gen.generate(z), bouncing.generate(z)
        torch.testing.assert_close(bounced[:, :, 0], carried[:, :, 0])  # frame 0 is not moved
        content, flow = gen.content_and_flow(z, 4)
        for block in gen.level_blocks:
            content = block(content)
        moved = cell_displacements(flow, gen._render_warped(3, content, flow, None), 2)
        folded = bounce_off_walls(moved, gen.renders[3](content, None))
        assert (folded - moved).abs().max() > 1e-3  # this flow takes the glyphs past a wall
        torch.testing.assert_close(bounced, gen._render_warped(3, content, folded, None), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--wall-bounce needs rigid cells"):
        model_config("movingmnist", motion_warp=True, wall_bounce=True)


def test_rigid_cells_need_the_motion_warp():
    with pytest.raises(ValueError, match="--rigid-cells must be 0, or a positive grid width with --motion-warp"):
        model_config("movingmnist", rigid_cells=2)
    with pytest.raises(ValueError, match="--rigid-cells"):
        model_config("movingmnist", motion_warp=True, rigid_cells=-1)


def test_still_frame_is_every_frame_while_the_flow_is_zero_and_needs_the_warp():
    torch.manual_seed(0)
    gen = Generator(model_config("movingmnist", n_frames=4, content_skip=True, motion_warp=True)).eval()
    z = gen.sample_z(3)
    with torch.no_grad():
        still, video = gen.still_frame(z), gen.generate(z)
    assert still.shape == (3, 1, 64, 64)
    for t in range(4):  # a fresh flow head is zero, so the warp leaves the content map where it is
        torch.testing.assert_close(video[:, :, t], still, rtol=0, atol=1e-6)
    used = {id(p) for p in gen.still_frame_parameters()}
    assert id(gen.fc.weight) in used and id(gen.renders[-1].conv.weight) in used
    assert not any(id(p) in used for module in (gen.flow_head, gen.clstm, gen.base) for p in module.parameters())
    with pytest.raises(ValueError, match="motion-warp"):
        Generator(model_config("movingmnist")).still_frame(z)


def test_still_maps_are_what_every_level_draws_while_the_flow_is_zero():
    torch.manual_seed(0)
    gen = Generator(model_config("movingmnist", n_frames=4, content_skip=True, motion_warp=True)).eval()
    z = gen.sample_z(2)
    with torch.no_grad():
        maps = gen.still_maps(z)
        assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8), (2, 64, 16, 16), (2, 32, 32, 32), (2, 32, 64, 64)]
        for level, (head, m) in enumerate(zip(gen.renders, maps), start=1):
            video = gen.generate(z, level=level)
            torch.testing.assert_close(video[:, :, 2], head(m), rtol=0, atol=1e-6)


def test_fold_time_puts_each_video_s_frames_in_order_and_unfold_time_undoes_it():
    videos = torch.randn(3, 2, 5, 4, 4)
    frames = fold_time(videos)
    assert frames.shape == (15, 2, 4, 4) and torch.equal(frames[7], videos[1, :, 2])
    assert torch.equal(unfold_time(frames, 3), videos)


@pytest.mark.parametrize("channels, size", [(1, 64), (3, 192)])
def test_frame_discriminator_gives_one_logit_per_frame(channels, size):
    dis = FrameDiscriminator(channels, size)
    assert dis(torch.randn(2, channels, size, size)).shape == (2,)
    with pytest.raises(ValueError, match="multiple of 16"):
        FrameDiscriminator(1, 72)


def test_minibatch_deviation_is_each_group_s_spread_given_to_its_members():
    h = torch.randn(8, 3, 2, 2)
    h[4] = h[0]  # samples 0 and 4 form a group of 2 (i mod 4)
    dev = minibatch_deviation(h, 2)
    assert dev.shape == (8, 1, 2, 2) and torch.all(dev == dev[:, :, :1, :1])  # one value per sample, every position
    expected = [(h[[i, i + 4]].var(0, unbiased=False) + 1e-8).sqrt().mean() for i in range(4)]  # with the 1e-8 floor
    assert torch.allclose(dev[:4, 0, 0, 0], torch.stack(expected), atol=1e-6)
    assert torch.equal(dev[:4], dev[4:]) and dev[0].max() < 1e-3  # alike frames: no spread
    assert minibatch_deviation(torch.randn(6, 3, 2, 2), 4).shape == (6, 1, 2, 2)  # groups of 3: 4 does not divide 6
    assert torch.allclose(minibatch_deviation(h[:1], 4), torch.full((1, 1, 2, 2), 1e-4))  # a group of one


def test_frame_discriminator_with_a_deviation_channel_sees_its_group_only():
    torch.manual_seed(0)
    dis = FrameDiscriminator(1, 64, deviation_group=4).eval()
    plain = FrameDiscriminator(1, 64)
    assert dis.layers[-1].in_features == plain.layers[-1].in_features + 16  # one more channel of 4x4
    assert list(dis.state_dict()) == list(plain.state_dict())  # the same names: runs without it still load
    x = torch.randn(8, 1, 64, 64)
    y = dis(x)
    assert y.shape == (8,)
    x2 = x.clone()
    x2[1] = torch.randn(1, 64, 64)  # sample 1 is in group 1 (1, 3, 5, 7 with 8 frames in groups of 4: i mod 2)
    y2 = dis(x2)
    assert torch.equal(y2[[0, 2, 4, 6]], y[[0, 2, 4, 6]]) and not torch.allclose(y2[[3, 5, 7]], y[[3, 5, 7]])
    with pytest.raises(ValueError, match="deviation_group"):
        FrameDiscriminator(1, 64, deviation_group=-1)
