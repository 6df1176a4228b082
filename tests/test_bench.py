"""The timing harness (sonic_learn.bench): what it reports, what it rejects, and (GPU) that it times
the device work, not the host's issue of it."""

from __future__ import annotations

import time

import pytest
import torch

from sonic_learn import bench


def test_cpu_measure_reports_ordered_quantiles():
    t = bench.measure(lambda: time.sleep(0.001), reps=5, warmup=1)
    assert t.timer == "perf_counter" and t.reps == 5
    assert 1.0 <= t.p20_ms <= t.median_ms <= t.p80_ms  # each call sleeps >= 1 ms


@pytest.mark.parametrize("kwargs,err,match", [
    ({"reps": 0}, ValueError, "reps"),
    ({"warmup": -1}, ValueError, "warmup"),
    ({"min_time_s": float("nan")}, ValueError, "min_time_s"),
    ({"host_ahead": 1}, TypeError, "host_ahead"),
])
def test_measure_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        bench.measure(lambda: None, **kwargs)


@pytest.mark.gpu
def test_host_ahead_times_device_work_only():
    """A call that spends 3 ms on the host before launching a ~20 us kernel: with the host held
    ahead the events see the kernel only; without, they see the host's 3 ms."""
    x = torch.randn(1 << 20, device="cuda")

    def slow_host_call():
        time.sleep(0.003)
        x.mul_(1.0)

    ahead = bench.measure(slow_host_call, device="cuda", reps=5, host_ahead=True)
    behind = bench.measure(slow_host_call, device="cuda", reps=5, host_ahead=False)
    assert ahead.median_ms < 1.0, ahead
    assert behind.median_ms >= 2.5, behind


def test_environment_describes_the_timer_of_its_device():
    env = bench.environment("cpu")
    assert env["timer"] == bench.TIMER_CPU and "perf_counter" in env["timer"]
    assert env["device"].startswith("cpu: ") and "  " not in env["device"]
    with pytest.raises(ValueError, match="device must be a cpu or cuda device"):
        bench.environment("meta")
    if torch.cuda.is_available():
        assert bench.environment("cuda")["timer"] == bench.TIMER_CUDA


def test_layer_inputs_are_seeded_shaped_and_scaled():
    shape = (64, 32, 16, 8, 2)  # T, d, n, E, K
    x, router_w, w1, w2, dout = bench.layer_inputs(shape, seed=3, device="cpu")
    assert [t.shape for t in (x, router_w, w1, w2, dout)] == [(64, 32), (32, 8), (8, 32, 32), (8, 16, 32), (64, 32)]
    assert all(t.dtype == torch.bfloat16 for t in (x, router_w, w1, w2, dout))
    again = bench.layer_inputs(shape, seed=3, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip((x, router_w, w1, w2, dout), again))  # same seed, same tensors
    assert not torch.equal(x, bench.layer_inputs(shape, seed=4, device="cpu")[0])
    assert 0.5 < float(x.float().std()) < 2 and 0.5 < float(w1.float().std()) * 32**0.5 < 2  # x ~ 1, w1 ~ d^-1/2


@pytest.mark.parametrize("text,message", [("64,32,16,8", "five positive integers"), ("64,32,16,8,0", "five positive"),
                                          ("64,x,16,8,2", "five integers")])
def test_parse_layer_shape_rejects_bad_shapes(text, message, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    assert bench.parse_layer_shape(parser, "64,32,16,8,2") == (64, 32, 16, 8, 2)
    with pytest.raises(SystemExit):
        bench.parse_layer_shape(parser, text)
    assert f"--shape: {message}" in capsys.readouterr().err
