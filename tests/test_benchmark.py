"""benchmark.py: the paper's cost table reproduced by our code, and the speed report's structure."""

import json

import pytest

import benchmark


@pytest.fixture(scope="module")
def paper_costs():
    return benchmark.measure_costs("paper", batch_size=8)


def test_cost_table_structure(paper_costs):
    assert paper_costs["params"] == {"G": 88_032_460, "D": 116_077_060}
    for key in ("gflops", "activation_bytes"):
        for net in ("G", "D"):
            assert set(paper_costs[key][net]) == {"naive", "frame", "batch", "proposed"}
            assert all(len(levels) == 4 for levels in paper_costs[key][net].values())


def test_generator_flops_are_twice_the_papers_macs_within_one_percent(paper_costs):
    for mode, paper in benchmark.PAPER_GFLOPS["G"].items():
        ours = list(paper_costs["gflops"]["G"][mode])
        ours[0] += paper_costs["skipped_clstm_gflops"]  # the authors convolved the zero inputs
        for level, (o, p) in enumerate(zip(ours, paper), start=1):
            assert o == pytest.approx(2 * p, rel=0.01), f"G {mode} L{level}"
    # without the correction, level 1 is lighter by exactly the skipped convolutions
    assert paper_costs["gflops"]["G"]["naive"][0] < 2 * 192.41 * 0.8


def test_discriminator_flops_are_one_constant_factor_of_the_papers(paper_costs):
    agreement = benchmark.paper_agreement(paper_costs)
    assert agreement["D_spread"] <= 0.04
    assert 1.0 < agreement["D_factor"] < 1.3


def test_subsampling_cuts_memory_like_the_paper(paper_costs):
    act = paper_costs["activation_bytes"]
    g = sum(act["G"]["naive"]) / sum(act["G"]["proposed"])
    d = sum(act["D"]["naive"]) / sum(act["D"]["proposed"])
    assert g == pytest.approx(7.07, rel=0.05)  # paper: 7.716 GB -> 1.091 GB
    assert d == pytest.approx(20.35, rel=0.1)  # paper: 15.689 GB -> 0.771 GB
    # every mode is cheaper than naive from level 2 on, and level 1 is never subsampled
    for net in ("G", "D"):
        for mode in ("frame", "batch", "proposed"):
            assert act[net][mode][0] == pytest.approx(act[net]["naive"][0], rel=1e-6)  # but a frame index
            assert all(a < n for a, n in zip(act[net][mode][1:], act[net]["naive"][1:]))


def test_costs_cli_json(capsys):
    benchmark.main(["costs", "--preset", "movingmnist", "--batch-size", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"params", "gflops", "activation_bytes"}
    assert out["params"] == {"G": 6_420_420, "D": 7_485_060}


def test_speed_cli_json(capsys):
    benchmark.main(["speed", "--preset", "movingmnist", "--batch-size", "2", "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"s_per_iter", "tflops", "peak_tflops", "peak_memory_bytes"}
    assert out["s_per_iter"] > 0 and out["tflops"] > 0 and out["peak_tflops"] > 0
    assert out["peak_memory_bytes"] is None and out["finite"]
    assert out["gflop_per_iter"] > 10  # the whole step, double backward included
    benchmark.main(["speed", "--batch-size", "8", "--device", "cpu", "--steps", "1", "--warmup", "0", "--json",
                    "--motion-warp"])
    warped = json.loads(capsys.readouterr().out)
    # 214.3 for the preset's generator; the warp makes it 197.4, the kept-on frame discriminator adds 9.1
    assert warped["motion_warp"] and round(warped["gflop_per_iter"], 1) == 206.5
