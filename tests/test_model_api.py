"""Model API: registry, checkpoints carrying their config, and clear errors on bad input."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bidiff.models import create_model, get_config, list_configs, load_checkpoint, save_checkpoint, set_deploy
from bidiff.models.checkpoint import LATENT_SCALE, binary_weight_keys, read_metadata, unpack_latents
from bidiff.models.configs import ModelConfig
from bidiff.models.layers import HardBinaryConv
from bidiff.runtime.binary_op import binary_conv2d_reference, pack_weights, weight_scale


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny-binary").eval(), get_config("tiny-binary")


def test_registry_lists_and_rejects():
    assert {"official-x2", "official-x4", "golden-small", "bidiff-s-x2", "tiny-binary"} <= set(list_configs())
    with pytest.raises(ValueError, match=r"unknown config 'nope'; valid configs: .*official-x2"):
        get_config("nope")


@pytest.mark.parametrize("name", list_configs())
def test_every_config_round_trips_as_json(name):
    """A config survives its JSON form (what checkpoints and manifests store)."""
    cfg = get_config(name)
    assert cfg.name == name and ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("name", list_configs())
def test_every_config_builds_and_runs(name):
    cfg = get_config(name)
    model = create_model(cfg).eval()
    assert model.input_multiple == cfg.input_multiple
    s = 4 * cfg.input_multiple
    with torch.no_grad():
        eps = model(torch.randn(1, 3, s, s), torch.rand(1, 3, s, s), torch.tensor([[5]]))
    assert eps.shape == (1, cfg.formulation.output_channels, s, s) and torch.isfinite(eps).all()


@pytest.mark.parametrize("x_shape,cond_shape,t,msg", [
    ((1, 4, 16, 16), (1, 3, 16, 16), [[5]], r"x_t must be \[B, 3, H, W\]"),
    ((1, 3, 16, 16), (1, 1, 16, 16), [[5]], r"cond must be \[B, 3, H, W\]"),
    ((1, 3, 18, 16), (1, 3, 18, 16), [[5]], "H and W must be multiples of 8, got 18x16"),
    ((1, 3, 16, 16), (1, 3, 16, 16), [[2000]], r"t must be integer timesteps in 0..1999"),
    ((1, 3, 16, 16), (1, 3, 16, 16), [[-1]], r"t must be integer timesteps in 0..1999"),
    ((1, 3, 16, 16), (1, 3, 16, 16), [[5.0]], r"t must be integer timesteps"),
    ((1, 3, 16, 16), (2, 3, 16, 16), [[5]], r"differ in batch or size"),
])
def test_bad_inputs_raise_value_error(x_shape, cond_shape, t, msg):
    model = create_model("golden-small")       # 4 levels: input multiple 8
    with pytest.raises(ValueError, match=msg):
        model(torch.randn(*x_shape), torch.rand(*cond_shape), torch.tensor(t))


def test_safetensors_round_trip_carries_config(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, cfg, {"steps": 7})
    loaded, cfg2 = load_checkpoint(path)
    assert cfg2 == cfg and cfg2.formulation.type == "residual"
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def _with_trained_latents(tiny):
    """A copy of the tiny model whose 1-bit convs' latents have trained magnitudes and signs."""
    model, cfg = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HardBinaryConv):
                m.weight.copy_(torch.randn_like(m.weight) * 0.02)
    return model, cfg


def test_compact_checkpoint_keeps_every_sign_and_alpha(tmp_path, tiny):
    """int8 latents (a work-in-progress or shipped checkpoint in git): the 1-bit forward's inputs
    survive, the full-precision tensors are bit-identical, and the file is smaller."""
    model, cfg = _with_trained_latents(tiny)
    full, small = tmp_path / "full.safetensors", tmp_path / "small.safetensors"
    save_checkpoint(full, model, cfg)
    save_checkpoint(small, model, cfg, {"steps": 3}, latents="int8")
    assert small.stat().st_size < 0.6 * full.stat().st_size
    keys = binary_weight_keys(model)
    with safe_open(str(small), framework="pt") as f:
        assert f.get_tensor(keys[0]).dtype == torch.int8 and keys[0] + LATENT_SCALE in f.keys()
    loaded, cfg2 = load_checkpoint(small)
    assert cfg2 == cfg and read_metadata(small)["steps"] == "3"
    own = dict(model.named_modules())
    for name, m in loaded.named_modules():
        if isinstance(m, HardBinaryConv):
            assert torch.equal(torch.sign(m.weight), torch.sign(own[name].weight))
            torch.testing.assert_close(m.scaling_factor(), own[name].scaling_factor(), rtol=1e-6, atol=0)
            step = own[name].weight.abs().amax() / 127
            assert (m.weight - own[name].weight).abs().max() <= step
    latents = set(keys)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and (k in latents or torch.equal(a, b))
    q = {keys[0]: torch.ones(2, dtype=torch.int8)}
    with pytest.raises(ValueError, match=f"int8 tensor {keys[0]} has no {keys[0]}.int8_scale"):
        unpack_latents(q)


def test_sign_checkpoint_keeps_the_forward_in_a_bit_a_weight(tmp_path, tiny):
    """The shipped form: latents unpack to +-alpha with the trained signs and alphas, so the
    network computes what it did (to float rounding); full-precision tensors are bit-identical;
    a latent of exactly 0 and an unknown form are refused."""
    model, cfg = _with_trained_latents(tiny)
    signs = tmp_path / "signs.safetensors"
    save_checkpoint(signs, model, cfg, {"steps": 3}, latents="signs")
    keys = binary_weight_keys(model)
    with safe_open(str(signs), framework="pt") as f:
        bits = f.get_tensor(keys[0])
        assert bits.dtype == torch.uint8 and bits.numel() * 8 < model.state_dict()[keys[0]].numel() + 8 * bits.shape[0]
    loaded, cfg2 = load_checkpoint(signs)
    assert cfg2 == cfg and read_metadata(signs)["steps"] == "3"
    own = dict(model.named_modules())
    for name, m in loaded.named_modules():
        if isinstance(m, HardBinaryConv):
            assert torch.equal(torch.sign(m.weight), torch.sign(own[name].weight))
            alpha = own[name].scaling_factor()
            torch.testing.assert_close(m.scaling_factor(), alpha, rtol=1e-6, atol=0)
            torch.testing.assert_close(m.weight.abs(), alpha.expand_as(m.weight), rtol=1e-6, atol=0)
    latents = set(keys)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and (k in latents or torch.equal(a, b))
    x, cond = torch.randn(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, cond, torch.tensor([1999])), model.eval()(x, cond, torch.tensor([1999])),
                                   rtol=0, atol=1e-4)
    with torch.no_grad():
        own[next(n for n, m in own.items() if isinstance(m, HardBinaryConv))].weight[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match=r"has latent weights of exactly 0, whose sign 0 one bit cannot store: "
                                         r"keep this checkpoint with int8 latents"):
        save_checkpoint(tmp_path / "zero.safetensors", model, cfg, latents="signs")
    with pytest.raises(ValueError, match="unknown latent form 'int4'; valid: float32, int8, signs"):
        save_checkpoint(tmp_path / "x.safetensors", model, cfg, latents="int4")
    assert not (tmp_path / "zero.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


def test_checkpoint_for_another_config_names_keys(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, cfg)
    with pytest.raises(ValueError, match=r"does not fit config 'bidiff-s-x2': .*(missing|other shapes) \(first: "):
        load_checkpoint(path, "bidiff-s-x2")


def test_official_pth_needs_a_config_name(golden_dir):
    with pytest.raises(ValueError, match="pass its config name"):
        load_checkpoint(golden_dir / "small" / "net_g.pth")
    with pytest.raises(ValueError, match="does not fit config 'tiny-binary'"):
        load_checkpoint(golden_dir / "small" / "net_g.pth", "tiny-binary")


def test_params_ema_and_module_prefix(tmp_path, golden_dir, golden_small_model):
    sd = torch.load(golden_dir / "small" / "net_g.pth", weights_only=True)["params"]
    path = tmp_path / "ema.pth"
    torch.save({"params_ema": {"module." + k: v for k, v in sd.items()}}, path)
    model, _ = load_checkpoint(path, "golden-small")
    ref, _ = golden_small_model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("channels,kernel", [(16, 3), (32, 1), (48, 3), (96, 1), (33, 3)])
def test_deploy_binary_conv_equals_numpy_reference(channels, kernel):
    """Deploy mode is the exported arithmetic: BIConv's core equals binary_op's reference."""
    from bidiff.models.layers import BIConv
    torch.manual_seed(channels)
    conv = BIConv(channels, kernel).eval()
    with torch.no_grad():
        conv.binary_conv.weight.normal_()
        conv.binary_conv.weight[0, 0, 0, 0] = 0.0          # exact zero weight: packs as +1
    set_deploy(conv)
    x = torch.randn(1, channels, 7, 9)
    x[0, 0, 0, :3] = 0.0                                    # exact zero activation: +1
    with torch.no_grad():
        got = conv.binary_conv(conv.binary_act(x)).numpy()
    w = conv.binary_conv.weight.detach().numpy()
    ref = binary_conv2d_reference(x.numpy(), pack_weights(w), weight_scale(w), channels=channels, kernel=kernel)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    set_deploy(conv, False)
    with torch.no_grad():
        official = conv.binary_conv(conv.binary_act(x)).numpy()
    assert not np.allclose(official, ref, atol=1e-5)        # the zero cases really differ


@pytest.mark.parametrize("grown_name,base_network,prefix,last", [
    ("tiny-binary-cond", {}, "cond_embed.", lambda m: m.cond_embed.proj.weight),
    ("tiny-head", {"head_blocks": 0}, "head.0.", lambda m: m.head[0].res_block.block2.conv.weight)],
    ids=["cond_embed", "head_blocks"])
def test_grown_parts_start_as_the_network_without_them(grown_name, base_network, prefix, last):
    """cond_embed (blocks.CondEmbed) and head_blocks (unet.BIDiffSRUNet): loaded from the
    weights of the same network without them, the output is bit for bit the old one (their
    last layer starts at zero); once that layer moves, the output changes."""
    from bidiff.models.unet import BIDiffSRUNet
    torch.manual_seed(0)
    grown = create_model(grown_name)
    network = {k: v for k, v in get_config(grown_name).network.items() if k != "cond_embed"}
    base = BIDiffSRUNet(**{**network, **base_network})
    missing = grown.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(prefix) for k in missing)
    g = torch.Generator().manual_seed(1)
    x_t, cond = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    t = torch.tensor([[1999], [1999]])
    with torch.no_grad():
        assert torch.equal(base(x_t, cond, t), grown(x_t, cond, t))
        last(grown).normal_(0.0, 0.5, generator=g)
        assert not torch.allclose(base(x_t, cond, t), grown(x_t, cond, t), atol=1e-3)


def test_head_blocks_need_a_full_precision_top_level():
    from bidiff.models.unet import BIDiffSRUNet
    with pytest.raises(ValueError, match=r"head_blocks needs a full-precision top level \(32 in fp_res\), got fp_res \[\]"):
        BIDiffSRUNet(**{**get_config("tiny-binary").network, "head_blocks": 1})
