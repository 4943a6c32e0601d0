"""bidiff.models is the official BI-DiffSR, number for number (tests/golden)."""
import json

import numpy as np
import pytest
import torch

from bidiff.models import create_model, get_config, load_checkpoint
from bidiff.models.blocks import PositionalEncoding
from bidiff.models.layers import BinaryActivation, HardBinaryConv
from bidiff.models.sampler import sample


def test_binary_activation_keeps_official_sign(golden_npz):
    u = golden_npz("units.npz")
    out = BinaryActivation()(torch.tensor(u["binact_in"]))
    np.testing.assert_array_equal(out.numpy(), u["binact_out"])   # sign(0) = 0, sign(1e-30) = 1


def test_binary_activation_gradient_is_bireal():
    x = torch.tensor([-2.0, -0.75, -0.25, 0.0, 0.25, 0.75, 2.0], requires_grad=True)
    BinaryActivation()(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0, 0.5, 1.5, 2.0, 1.5, 0.5, 0], atol=1e-7)


def test_hard_binary_conv(golden_npz):
    u = golden_npz("units.npz")
    conv = HardBinaryConv(3, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(u["hbc_weight"]))
    np.testing.assert_array_equal(conv.scaling_factor().numpy(), u["hbc_alpha"])
    np.testing.assert_array_equal(conv.effective_weight().detach().numpy(), u["hbc_effective_weight"])
    out = conv(torch.tensor(u["hbc_input"])).detach().numpy()
    np.testing.assert_allclose(out, u["hbc_output"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dim", [16, 64])
def test_positional_encoding(golden_npz, dim):
    u = golden_npz("units.npz")
    t = u["posenc_t"]
    pe = PositionalEncoding(dim)(torch.tensor(t).reshape(-1, 1)).numpy()
    # float32 exp/sin are not correctly rounded and differ by an ulp between CPUs (measured:
    # the golden machine's exp differs from this one's in 1 of 32 frequencies); one ulp of the
    # angle t*f is t * 2^-23, so allow two of those per row. dim 16 happens to agree exactly.
    atol = 2 * np.maximum(t, 1)[:, None] * 2.0 ** -23
    assert np.all(np.abs(pe - u[f"posenc_dim{dim}"]) <= atol)


def test_golden_small_config_is_the_golden_network(golden_dir):
    """The registry's golden-small is the network the golden checkpoint was made with."""
    ref = json.loads((golden_dir / "small" / "config.json").read_text())["network_g"]
    assert ref.pop("type") == "BIDiffSRUNet"
    assert get_config("golden-small").network == ref


def test_small_checkpoint_loads_through_official_path(golden_small_model, golden_dir):
    model, cfg = golden_small_model
    assert cfg.name == "golden-small"
    sd = torch.load(golden_dir / "small" / "net_g.pth", weights_only=True)["params"]
    assert list(model.state_dict()) == list(sd)
    keys = [line.split("\t")[0] for line in (golden_dir / "small" / "keys.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert list(model.state_dict()) == keys


def _net_inputs(d, i):
    return torch.tensor(d["x_t"]), torch.tensor(d["cond"]), torch.tensor([[int(d["t"][i])]])


@torch.no_grad()
def test_eps_float32(golden_small_model, golden_npz):
    model, _ = golden_small_model
    d = golden_npz("small/net_32x32.npz")
    for i in range(len(d["t"])):
        eps = model.float()(*_net_inputs(d, i)).numpy()
        np.testing.assert_allclose(eps, d["eps"][i], rtol=0, atol=2e-5, err_msg=f"t={d['t'][i]}")


@torch.no_grad()
def test_eps_float64_and_time_embedding(golden_npz, golden_dir):
    model, _ = load_checkpoint(golden_dir / "small" / "net_g.pth", "golden-small")
    model = model.double()
    d = golden_npz("small/net_32x32.npz")
    for i in range(len(d["t"])):
        x, c, t = _net_inputs(d, i)
        eps = model(x.double(), c.double(), t).numpy()
        np.testing.assert_allclose(eps, d["eps_float64"][i], rtol=0, atol=1e-8, err_msg=f"t={d['t'][i]}")
    model = model.float()
    t = torch.tensor(d["t"]).reshape(-1, 1)
    np.testing.assert_array_equal(model.timestep_level_mlp[0](t).numpy(), d["posenc"])
    np.testing.assert_allclose(model.timestep_level_mlp(t).numpy(), d["time_emb"], rtol=0, atol=1e-6)


@torch.no_grad()
def test_every_intermediate_at_t1000(golden_small_model, golden_npz):
    model, _ = golden_small_model
    model = model.float()
    d = golden_npz("small/net_32x32.npz")
    ref = golden_npz("small/intermediates_t1000_32x32.npz")
    got: dict[str, np.ndarray] = {}
    hooks = []
    for lst in ("downs", "mid", "ups"):
        for i, m in enumerate(getattr(model, lst)):
            key = f"{lst}.{i:02d}.{type(m).__name__}"
            hooks.append(m.register_forward_hook(lambda _m, _a, out, key=key: got.__setitem__(key, out.numpy())))
    hooks.append(model.final_conv.register_forward_hook(lambda _m, _a, out: got.__setitem__("final_conv", out.numpy())))
    model(*_net_inputs(d, list(d["t"]).index(1000)))
    for h in hooks:
        h.remove()
    assert sorted(got) == sorted(ref)
    for key in ref:
        # activations reach ~100 deep in the net: float32 rounding scales with magnitude
        atol = 2e-5 + 1e-6 * float(np.abs(ref[key]).max())
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=atol, err_msg=key)


@torch.no_grad()
def test_e2e_per_step_float32(golden_small_model, golden_npz):
    """Feed the official x_t at every step: eps agrees (sign flips on inputs ~1e-9 are allowed
    to move a few outputs, so require 99.9% of values within 1e-4 and the median far below)."""
    model, _ = golden_small_model
    model = model.float()
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    cond = torch.tensor(e["cond_padded"])
    for i, t in enumerate(e["timesteps"]):
        eps = model(torch.tensor(e["x_t_per_step"][i]), cond, torch.tensor([[int(t)]])).numpy()
        err = np.abs(eps - e["eps_per_step"][i])
        assert np.mean(err < 1e-4) >= 0.999 and np.median(err) < 1e-6, f"step {i}: max {err.max()}"


@torch.no_grad()
def test_whole_sampler_float64(golden_dir, golden_npz):
    model, cfg = load_checkpoint(golden_dir / "small" / "net_g.pth", "golden-small")
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    res = sample(model, torch.tensor(e["cond"]), noise=torch.tensor(e["noise"]), dtype=torch.float64,
                 formulation=cfg.formulation)
    np.testing.assert_allclose(res.raw.numpy(), e["f64_sr_raw"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.image.numpy(), np.clip(e["f64_sr_raw"], 0, 1), rtol=0, atol=1e-6)


def test_sampler_draws_official_noise_from_seed(golden_npz):
    e = golden_npz("small/e2e_lr16x16_x2.npz")
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(int(e["noise_seed"])))
    np.testing.assert_array_equal(noise.numpy(), e["noise"])


@torch.no_grad()
def test_official_full_config_counts_and_forward(golden_dir):
    counts = json.loads((golden_dir / "official_full_counts.json").read_text())
    cfg = get_config("official-x2")
    assert cfg.network == counts["config"]
    model = create_model(cfg).eval()
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == counts["total_param_numel"]
    binary = [k for k in sd if k.endswith("binary_conv.weight")]
    assert len(binary) == counts["n_binary_convs"]
    assert sum(sd[k].numel() for k in binary) == counts["binary_weight_count"]
    keys = [l.split("\t") for l in (golden_dir / "official_full_keys.txt").read_text().splitlines()
            if l and not l.startswith("#")]
    assert [k for k, *_ in keys] == list(sd)
    assert all(json.loads(shape) == list(sd[k].shape) for k, shape, *_ in keys)
    x = torch.randn(1, 3, 64, 64)
    eps = model(x, torch.rand(1, 3, 64, 64), torch.tensor([[1000]]))
    assert eps.shape == (1, 3, 64, 64) and torch.isfinite(eps).all()
