"""Shapes, parameter counts and semantics of the CDPDNet network (reference section 1)."""

import pytest
import torch

from cdpdnet.factory import build_model, build_network
from cdpdnet.networks import CDPDNet, NetworkConfig, WindowCrossAttentionFusion
from cdpdnet.preset import load_preset


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_counts_match_reference():
    # reference 1.10: 66,188,120 registered (incl. dead modules), 64,717,616 that receive gradients
    assert count(CDPDNet(NetworkConfig(reference_dead_modules=True))) == 66_188_120
    net = build_network("paper")
    assert count(net) == 64_717_616
    groups = {}
    for name, p in net.named_parameters():
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + p.numel()
    assert groups["decoder"] == 15_349_440 and groups["upsample"] == 1_812_992
    assert groups["skip_films"] == 13_108_800 and groups["text_to_vision"] == 131_328
    assert groups["ttpg"] == 61_974 + 98_373 + 939_261


def test_paper_dino_is_vit_b14_without_loading_weights():
    from transformers import Dinov2Model

    from cdpdnet.dino_weights import dino_config_for

    cfg = dino_config_for("facebook/dinov2-base")
    with torch.device("meta"):
        vit = Dinov2Model(cfg)
    assert count(vit) == 86_580_480
    assert cfg.hidden_size == load_preset("paper").network.dino_dim


@pytest.mark.parametrize("preset,dino", [("tiny", "random:tiny"), ("lite", "random:small"), ("lite-wide", "random:small")])
def test_forward_shapes(preset, dino):
    p = load_preset(preset)
    model = build_model(p, num_tasks=4, dino=dino)
    x = torch.rand(2, p.network.in_channels, *p.patch_size)  # lite-wide: soft-tissue and lung windows
    feats = model.dino(x)
    used = (p.patch_size[0] // p.network.dino_group) * p.network.dino_group
    assert len(feats) == len(p.network.fusion_stages)
    assert all(f.shape[:3] == (2, p.network.dino_dim, used) for f in feats)
    with torch.no_grad():
        y = model(x, torch.tensor([0, 3]))
    assert y.shape == (2, 32, *p.patch_size)
    assert torch.isfinite(y).all()


def test_paper_shapes_on_meta_device():
    """The full paper network traced on the meta device (no compute): 96^3 in, 32 x 96^3 out."""
    p = load_preset("paper")
    with torch.device("meta"):
        net = CDPDNet(p.network)
        x = torch.empty(2, 1, 96, 96, 96)
        feats = [torch.empty(2, 768, 84, 7, 7) for _ in range(3)]
        y = net(x, feats, torch.tensor([0, 8]))
    assert y.shape == (2, 32, 96, 96, 96)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build_model("tiny", num_tasks=3, dino="random:tiny").eval()
    m.net.set_text_embeddings(torch.randn(32, 384), torch.randn(3, 384))
    return m


def test_task_prompt_is_per_sample(tiny):
    """A batch mixing source datasets equals running each sample alone (reference bug 5 fixed)."""
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        both = tiny(x, torch.tensor([0, 2]))
        a = tiny(x[:1], torch.tensor([0]))
        b = tiny(x[1:], torch.tensor([2]))
        other = tiny(x[:1], torch.tensor([1]))
    torch.testing.assert_close(both[:1], a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1:], b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, other)  # the task prompt does change the output


def test_unknown_task_uses_mean_prompt_and_bad_task_is_refused(tiny):
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        y = tiny(x, None)
    assert y.shape == (1, 32, 32, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        tiny(x, torch.tensor([3]))


def test_bad_input_shapes_give_clear_errors(tiny):
    with pytest.raises(ValueError, match="expected input"):
        tiny(torch.rand(1, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        tiny(torch.rand(1, 1, 30, 32, 32))


def test_text_embeddings_are_buffers_with_checked_shape(tiny):
    names = dict(tiny.net.named_buffers())
    assert "organ_embedding" in names and "task_embedding" in names
    assert not any("embedding" in n for n, _ in tiny.net.named_parameters())
    with pytest.raises(ValueError, match="organ_embedding must have shape"):
        tiny.net.set_text_embeddings(torch.zeros(31, 384), torch.zeros(3, 384))


def test_cross_attention_crops_every_padded_axis():
    """Reference bug 15: stage sizes not multiples of the window on the third axis."""
    fuse = WindowCrossAttentionFusion(8, num_heads=2).eval()
    x, y = torch.rand(1, 8, 6, 6, 5), torch.rand(1, 8, 6, 6, 5)
    out = fuse(x, y)
    assert out.shape == x.shape
    # queries come from the DINO stream: changing y changes the result
    assert not torch.allclose(out, fuse(x, torch.rand_like(y)))


def test_dino_and_only_dino_is_frozen():
    m = build_model("tiny", num_tasks=2, dino="random:tiny")
    assert not any(p.requires_grad for p in m.dino.parameters())
    assert all(p.requires_grad for p in m.trainable_parameters())
    m.train()
    assert not m.dino.dino.training


def test_instance_norm_keeps_channels_last_and_matches_the_exact_kernel():
    """The CPU layout path (group_norm, one channel per group) normalises like nn.InstanceNorm3d."""
    from cdpdnet.networks.blocks import InstanceNorm3d

    torch.manual_seed(0)
    ours, ref = InstanceNorm3d(6, affine=True), torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())  # same parameters, same keys
    x = torch.randn(2, 6, 8, 10, 12) * 2 + 0.5
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    out = ours(cl)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(x), ref(x))  # contiguous input: the exact kernel


def test_instance_norm_of_a_bf16_input_is_computed_and_returned_in_float32():
    """Under autocast a conv hands the norm bf16; the statistics and the output are float32 (the gradient too)."""
    from cdpdnet.networks.blocks import InstanceNorm3d

    torch.manual_seed(0)
    norm = InstanceNorm3d(4, affine=True)
    x = (torch.randn(2, 4, 6, 8, 10) * 3 + 1).contiguous(memory_format=torch.channels_last_3d)
    xb = x.to(torch.bfloat16).requires_grad_()
    out = norm(xb)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, norm(xb.detach().float()))  # normalised from the bf16 values, in float32
    out.square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_preset_files_inherit_and_state_only_differences(tmp_path):
    import json

    (tmp_path / "wide.json").write_text(json.dumps({"name": "wide", "inherits_from": "lite",
                                                     "preprocess": {"spacing": [6.0, 6.0, 6.0]}}))
    (tmp_path / "wide2.json").write_text(json.dumps({"name": "wide2", "inherits_from": "wide.json",
                                                      "patch_size": [48, 32, 48]}))
    lite, p = load_preset("lite"), load_preset(tmp_path / "wide2.json")
    assert p.name == "wide2" and p.patch_size == [48, 32, 48]
    assert p.preprocess == dict(lite.preprocess, spacing=[6.0, 6.0, 6.0])  # nested update keeps hu_min etc.
    assert p.network == lite.network and p.train == lite.train
    (tmp_path / "loop.json").write_text(json.dumps({"name": "loop", "inherits_from": "loop.json"}))
    with pytest.raises(ValueError, match="circular inherits_from"):
        load_preset(tmp_path / "loop.json")
    (tmp_path / "orphan.json").write_text(json.dumps({"name": "x", "inherits_from": "no-such-preset"}))
    with pytest.raises(ValueError, match="unknown preset 'no-such-preset'"):
        load_preset(tmp_path / "orphan.json")


def test_head_hidden_adds_a_nonlinear_head_and_default_is_the_reference_head():
    """``network.head_hidden``: 1x1x1 ConvNormAct (width h) before the class conv; None keeps the linear head."""
    base = dict(load_preset("tiny").network.to_dict())
    ref = CDPDNet(NetworkConfig.from_dict(base))
    assert not any(k.startswith("head_hidden") for k in ref.state_dict())  # old checkpoints still load
    net = CDPDNet(NetworkConfig.from_dict(dict(base, head_hidden=16)))
    c0 = ref.cfg.widths()[0]
    assert count(net) - count(ref) == (c0 * 16 + 16) + 2 * 16 + (16 - c0) * 32  # conv, norm affine, wider class conv
    assert net.seg_outputs[-1].in_channels == 16
    x = torch.rand(2, 1, 16, 32, 32)
    feats = [torch.rand(2, base["dino_dim"], 14, 2, 2) for _ in base["fusion_stages"]]
    with torch.no_grad():
        y = net(x, feats, torch.tensor([0, 1]))
    assert y.shape == (2, 32, 16, 32, 32) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="head_hidden must be a positive width"):
        NetworkConfig.from_dict(dict(base, head_hidden=0))


def test_head_float32_keeps_the_head_out_of_bf16_autocast():
    """``network.head_float32``: under bf16 autocast the head computes (and returns) float32 logits, the rest
    stays bf16; without it the logits come out in bf16. Same parameters either way."""
    base = dict(load_preset("tiny").network.to_dict(), head_hidden=16)
    torch.manual_seed(0)
    plain = CDPDNet(NetworkConfig.from_dict(base))
    f32 = CDPDNet(NetworkConfig.from_dict(dict(base, head_float32=True)))
    f32.load_state_dict(plain.state_dict())
    plain.eval(), f32.eval()  # no drop path: the two must see the same network
    x = torch.rand(2, 1, 16, 32, 32)
    feats = [torch.rand(2, base["dino_dim"], 14, 2, 2) for _ in base["fusion_stages"]]
    task = torch.tensor([0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y_f32 = plain(x, feats, task), f32(x, feats, task)
    assert y_plain.dtype == torch.bfloat16 and y_f32.dtype == torch.float32
    torch.testing.assert_close(y_f32, y_plain.float(), atol=0.1, rtol=0.05)  # the same network, rounded differently
    with torch.no_grad():
        torch.testing.assert_close(f32(x, feats, task), plain(x, feats, task))  # no autocast: identical


def test_decoder_kernels_reference_quirk_and_mirror():
    """The reference's decoder convs are all 3x3x3 (nnU-Net v1's ``conv_kernel_sizes[-(u+1)]``);
    ``decoder_kernels: "mirror"`` gives each decoder stage its encoder stage's kernel (nnU-Net v2)."""
    paper = build_network("paper")
    assert all(c.conv.kernel_size == (3, 3, 3) for blk in paper.decoder for c in blk)
    base = dict(load_preset("tiny").network.to_dict())
    assert base["conv_kernels"][0] == [1, 3, 3]
    ref = CDPDNet(NetworkConfig.from_dict(base))
    mirror = CDPDNet(NetworkConfig.from_dict(dict(base, decoder_kernels="mirror")))
    kernels = [[tuple(c.conv.kernel_size) for c in blk] for blk in mirror.decoder]
    n = len(base["pool_strides"])
    assert kernels == [[tuple(base["conv_kernels"][n - 1 - u])] * base["convs_per_stage"] for u in range(n)]
    assert kernels[-1][0] == (1, 3, 3) and ref.decoder[-1][0].conv.kernel_size == (3, 3, 3)
    assert count(ref) - count(mirror) == 2 * 3 * 3 * (2 * ref.cfg.widths()[0] * ref.cfg.widths()[0] + ref.cfg.widths()[0] ** 2)
    x = torch.rand(2, 1, 16, 32, 32)
    feats = [torch.rand(2, base["dino_dim"], 14, 2, 2) for _ in base["fusion_stages"]]
    with torch.no_grad():
        assert mirror(x, feats, torch.tensor([0, 1])).shape == (2, 32, 16, 32, 32)
    with pytest.raises(ValueError, match="decoder_kernels must be 'reference' or 'mirror'"):
        NetworkConfig.from_dict(dict(base, decoder_kernels="v2"))


def test_deep_supervision_heads_on_the_coarser_decoder_outputs():
    """``network.deep_supervision = k``: k extra 1x1x1 heads (with the prior bias) on the decoder outputs
    above the last, returned only when asked (training); the main output is unchanged; 0 adds nothing."""
    base = dict(load_preset("tiny").network.to_dict(), head_bias=-4.0)
    ref = CDPDNet(NetworkConfig.from_dict(base))
    assert not any(k.startswith("aux_outputs") for k in ref.state_dict())  # old checkpoints still load
    net = CDPDNet(NetworkConfig.from_dict(dict(base, deep_supervision=2))).eval()
    x = torch.rand(2, 1, 16, 32, 32)
    feats = [torch.rand(2, base["dino_dim"], 14, 2, 2) for _ in base["fusion_stages"]]
    with torch.no_grad():
        y, aux = net(x, feats, torch.tensor([0, 1]), aux=True)
        plain = net(x, feats, torch.tensor([0, 1]))
    assert torch.equal(y, plain) and y.shape == (2, 32, 16, 32, 32)
    size = [16, 32, 32]
    for a, stride in zip(aux, base["pool_strides"]):  # finest first: stage 1, then stage 2
        size = [s // k for s, k in zip(size, stride)]
        assert a.shape == (2, 32, *size)
    assert all(torch.all(h.bias == -4.0) for h in net.aux_outputs)
    with pytest.raises(ValueError, match="deep_supervision must lie in"):
        NetworkConfig.from_dict(dict(base, deep_supervision=len(base["pool_strides"])))
