"""The numpy diffusion arithmetic shared with the device, against the official run."""
import numpy as np
import pytest

from bidiff.runtime import schedule
from bidiff.runtime.bicubic import resize_bicubic, upscale_condition


def test_schedule_tables_are_bit_exact(golden_npz):
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    assert schedule.linear_betas().dtype == np.float32
    np.testing.assert_array_equal(schedule.linear_betas(), e["betas"])
    np.testing.assert_array_equal(schedule.alphas_cumprod(), e["alphas_cumprod"])


def test_leading_timesteps(golden_npz):
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    sched = schedule.DDIMScheduler()
    np.testing.assert_array_equal(sched.set_timesteps(50), e["timesteps"])
    np.testing.assert_array_equal(schedule.timestep_group(e["timesteps"]), e["group_index"])
    assert list(sched.set_timesteps(10)) == [1800, 1600, 1400, 1200, 1000, 800, 600, 400, 200, 0]
    assert list(sched.set_timesteps(1)) == [0]


def test_trailing_and_linspace_timesteps():
    """diffusers' spacings; a 2-step linspace x0 sampler hands its second call the first call's
    estimate within sqrt(1 - abar_0) = 0.001 of the noise, and returns the second's x0."""
    trailing = schedule.DDIMScheduler(timestep_spacing="trailing")
    assert list(trailing.set_timesteps(5)) == [1999, 1599, 1199, 799, 399]
    sched = schedule.DDIMScheduler(timestep_spacing="linspace", prediction_type="sample")
    assert list(sched.set_timesteps(5)) == [1999, 1499, 1000, 500, 0]
    assert list(sched.set_timesteps(1)) == [1999]                 # diffusers: [0]
    assert list(sched.set_timesteps(2)) == [1999, 0]
    rng = np.random.default_rng(0)
    x_T, first, second = (rng.normal(0, s, (2, 3, 4, 4)).astype(np.float32) for s in (1, 0.2, 0.2))
    x_0 = sched.step(first, 0, x_T).prev_sample
    assert 0 < np.abs(x_0 - first).max() < 0.002 * np.abs(x_T).max() + 1e-6
    np.testing.assert_array_equal(sched.step(second, 1, x_0).prev_sample, second)
    with pytest.raises(ValueError, match="^timestep_spacing must be one of leading, trailing, linspace, got 'middle'$"):
        schedule.DDIMScheduler(timestep_spacing="middle")


@pytest.mark.parametrize("bad", [0, -3, 2001])
def test_bad_step_counts(bad):
    with pytest.raises(ValueError, match="steps must be between 1 and 2000"):
        schedule.DDIMScheduler().set_timesteps(bad)


def test_step_before_set_timesteps_refuses():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        schedule.DDIMScheduler().step(np.zeros(3, np.float32), 0, np.zeros(3, np.float32))


def test_group_map(golden_npz):
    u = golden_npz("units.npz")
    np.testing.assert_array_equal(schedule.timestep_group(np.arange(2000)), u["group_index_for_t_0_1999"])
    assert schedule.group_ranges() == [(0, 399), (400, 799), (800, 1199), (1200, 1599), (1600, 1999)]


@pytest.mark.parametrize("prefix,dtype", [("", np.float32), ("f64_", np.float64)])
def test_ddim_update_reproduces_official_trajectory(golden_npz, prefix, dtype):
    """Feeding the official x_t and eps, every update lands exactly on the next official x_t."""
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    xs, eps = e[prefix + "x_t_per_step"], e[prefix + "eps_per_step"]
    sched = schedule.DDIMScheduler()
    sched.set_timesteps(50)
    for i in range(50):
        out = sched.step(eps[i], i, xs[i])
        assert out.prev_sample.dtype == dtype
        nxt = xs[i + 1] if i < 49 else e[prefix + "sr_raw_padded"]
        np.testing.assert_allclose(out.prev_sample, nxt, rtol=0, atol=1e-6)
        if not prefix:
            np.testing.assert_allclose(out.pred_original_sample, e["x0_pred_per_step"][i], rtol=0, atol=1e-6)


def test_bicubic_condition_matches_golden(golden_npz):
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    cond = upscale_condition(e["lr_rgb_float_chw"], 2)
    np.testing.assert_allclose(cond, e["cond"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,out", [((17, 23), (34, 46)), ((13, 9), (52, 36)), ((40, 30), (20, 15))])
def test_bicubic_matches_opencv(shape, out):
    import cv2
    x = np.random.default_rng(1).random(shape + (3,)).astype(np.float32)
    ref = cv2.resize(x, out[::-1], interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(resize_bicubic(x, out), ref, rtol=0, atol=1e-6)


def test_time_shift_moves_only_the_network_timesteps():
    sched = schedule.DDIMScheduler(time_shift=160)
    ts = sched.set_timesteps(50)
    np.testing.assert_array_equal(ts, schedule.DDIMScheduler().set_timesteps(50))
    np.testing.assert_array_equal(sched.model_timesteps, np.maximum(ts - 160, 0))
    assert list(sched.model_timesteps[-5:]) == [0, 0, 0, 0, 0]
    # the update is the unshifted one
    x, e = np.linspace(-1, 1, 7, dtype=np.float32), np.linspace(1, -1, 7, dtype=np.float32)
    plain = schedule.DDIMScheduler()
    plain.set_timesteps(50)
    assert np.array_equal(sched.step(e, 3, x).prev_sample, plain.step(e, 3, x).prev_sample)


@pytest.mark.parametrize("bad", [-1, 2000, 1.5, True, "160"])
def test_time_shift_out_of_range_refuses(bad):
    with pytest.raises(ValueError, match=r"time_shift must be an integer in 0\.\.1999, got "):
        schedule.DDIMScheduler(time_shift=bad)


def test_time_shift_table_picks_the_nearest_measured_step_count():
    table = schedule.check_time_shifts('{"50": 240, "10": 0, "20": 40}')
    assert list(table.items()) == [(10, 0), (20, 40), (50, 240)]          # sorted, int keys
    assert schedule.check_time_shifts({20: 40}) == {20: 40} and schedule.check_time_shifts("") == {}
    got = {n: schedule.time_shift_for(n, table, 7) for n in (1, 10, 14, 15, 20, 31, 32, 50, 1000)}
    # log-nearest: 14 -> 10 (ratio 1.4 vs 1.43), 31 -> 20 (1.55 vs 1.61), 32 -> 50
    assert got == {1: 0, 10: 0, 14: 0, 15: 40, 20: 40, 31: 40, 32: 240, 50: 240, 1000: 240}
    assert schedule.time_shift_for(20, {}, 7) == 7                       # no table: the scalar
    assert schedule.time_shift_for(20, {10: 1, 40: 2}, 7) == 1           # a tie: the fewer steps


@pytest.mark.parametrize("bad,message", [
    ("{50: 1}", r"time_shifts must be a JSON object of steps -> shift, got '\{50: 1\}'"),
    ("[1, 2]", r"time_shifts must be a mapping of steps -> shift, got \[1, 2\]"),
    ({"0": 5}, r"time_shifts has a step count '0' outside 1\.\.2000"),
    ({"x": 5}, r"time_shifts has a step count 'x' outside 1\.\.2000"),
    ({"20": 2000}, r"time_shift must be an integer in 0\.\.1999, got 2000"),
])
def test_time_shift_table_refuses_bad_entries(bad, message):
    with pytest.raises(ValueError, match=rf"^{message}$"):
        schedule.check_time_shifts(bad)
