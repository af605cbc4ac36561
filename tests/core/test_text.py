"""Text encoders, prompt embeddings and free-text ROI resolution (cdpdnet.text)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

from cdpdnet import taxonomy as tx
from cdpdnet.text import (
    PUBLISHED_TASK_PROMPTS,
    PUBLISHED_TASK_ROW_KEYS,
    MiniLMEncoder,
    MissingTextError,
    PrecomputedEncoder,
    TextEncoder,
    TextEncoderError,
    build_text_encoder,
    compute_prompt_embeddings,
    default_minilm_folder,
    nearest_rois,
    reference_clip_embeddings,
    reorder_published_task_rows,
    task_keys_by_id,
)

REF = Path(os.environ.get("CDPDNET_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data" / "cdpdnet-text-embeddings"
# the published CLIP tables live in the workspace's shared/ folder beside the repository (reference data, not
# part of the product); without it these tests fail loudly rather than skip
needs_ref = pytest.mark.usefixtures("published_tables")


@pytest.fixture(scope="session")
def published_tables():
    assert (REF / "txt_encoding.pth").is_file(), f"published CLIP embeddings not found in {REF} (set CDPDNET_SHARED)"


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")  # shipped in requirements: a failure here is a real failure


@pytest.fixture(scope="module")
def minilm_prompts(minilm):
    return compute_prompt_embeddings(minilm)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


# --------------------------------------------------------------------------------------------- MiniLM


def test_minilm_embeddings(minilm):
    assert isinstance(minilm, MiniLMEncoder) and isinstance(minilm, TextEncoder)
    assert minilm.name == "minilm" and minilm.dim == 384
    e = minilm.encode(["liver tumor", "liver", "femur"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert _cos(e[0], e[1]) > _cos(e[0], e[2]) + 0.2
    assert minilm.encode([]).shape == (0, 384)
    assert torch.allclose(minilm.encode("liver"), e[1:2], atol=1e-5)  # a single string is one text


@pytest.mark.parametrize("text,expected", [("IVC", "inferior_vena_cava"), ("gall bladder", "gallbladder"),
                                           ("kidney tumour", "kidney_tumor")])
def test_nearest_rois_known_names(minilm, text, expected):
    for use_names in (True, False):  # by name match and by embedding similarity alone
        m = nearest_rois(minilm, text, k=3, use_names=use_names)
        assert len(m) == 3 and m[0].roi.name == expected and m[0].name == expected
        assert m[0].score >= m[1].score >= m[2].score
        assert len({x.roi.index for x in m}) == 3


def test_nearest_rois_free_text(minilm):
    m = nearest_rois(minilm, "tumour of the liver", k=2)
    assert m[0].name == "liver_tumor" and m[0].score < 1.0
    assert len(nearest_rois(minilm, "pancreas", k=40)) == 32


def test_compute_prompt_embeddings(minilm, minilm_prompts):
    d = minilm_prompts
    assert d["organ_embeddings"].shape == (32, 384) and d["task_embeddings"].shape == (11, 384)
    assert d["dim"] == 384 and d["encoder"] == "minilm"
    assert d["organ_prompts"][7] == "A computerized tomography of a Arota"
    assert d["organ_prompts"] == [tx.organ_prompt(r) for r in tx.ROIS]
    assert d["task_names"] == ["01", "02", "03", "04", "05", "07", "08", "09", "10", "12", "13"]
    assert d["task_prompts"][8] == tx.task_prompt(tx.DATASET_BY_KEY["10"].rois)
    assert torch.allclose(d["organ_embeddings"][5], minilm.encode([d["organ_prompts"][5]])[0], atol=1e-5)
    pub = compute_prompt_embeddings(minilm, rois=[], tasks=[("10", tx.DATASET_BY_KEY["10"].rois), ("x", [1])],
                                    published_task_prompts=True)
    assert pub["task_prompts"] == [PUBLISHED_TASK_PROMPTS["10"], tx.task_prompt([1])]
    assert pub["organ_embeddings"].shape == (0, 384)
    sub = compute_prompt_embeddings(minilm, rois=["liver", 27], tasks=[("liver+tumour", ["liver", "liver_tumor"])])
    assert sub["organ_names"] == ["liver", "liver_tumor"] and sub["organ_embeddings"].shape == (2, 384)
    assert sub["task_embeddings"].shape == (1, 384) and sub["task_names"] == ["liver+tumour"]


def test_prompt_embeddings_round_trip_through_a_file(minilm_prompts, tmp_path):
    d = minilm_prompts
    f = tmp_path / "emb.pt"
    torch.save({"net": {}, "text": d}, f)  # nested in a checkpoint-like dict
    assert torch.load(f, weights_only=True)["text"]["encoder"] == "minilm"
    enc = build_text_encoder(f"precomputed:{f}")
    assert enc.name == "minilm" and enc.dim == 384 and len(enc) == 43
    assert torch.equal(enc.encode([d["organ_prompts"][3], "Gallbladder"]), d["organ_embeddings"][[3, 3]])
    assert torch.equal(enc.encode(["10"]), d["task_embeddings"][8:9])
    enc2 = build_text_encoder(d)  # the dict itself, as loaded from a checkpoint
    assert torch.equal(enc2.encode(["liver"]), d["organ_embeddings"][5:6])


# --------------------------------------------------------------------------------------------- precomputed


def test_reorder_published_task_rows():
    assert PUBLISHED_TASK_ROW_KEYS == ("01", "02", "03", "04", "05", "07", "08", "09", "12", "13", "10")
    assert task_keys_by_id() == ["01", "02", "03", "04", "05", "07", "08", "09", "10", "12", "13"]
    rows = torch.arange(11.0)[:, None].expand(11, 4)
    out = reorder_published_task_rows(rows)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 8, 9]
    for t, key in enumerate(task_keys_by_id()):
        assert tx.DATASET_BY_KEY[key].task_id == t
    with pytest.raises(ValueError):
        reorder_published_task_rows(torch.zeros(10, 4))


@needs_ref
def test_reference_clip_embeddings():
    d = reference_clip_embeddings(REF)
    assert d["organ_embeddings"].shape == (32, 512) and d["task_embeddings"].shape == (11, 512)
    assert d["organ_embeddings"].dtype == torch.float32 and d["dim"] == 512
    norms = torch.cat([d["organ_embeddings"], d["task_embeddings"]]).norm(dim=1)
    assert norms.min() > 8.0 and norms.max() < 10.0  # not L2-normalised (about 8 to 9.6)
    raw = torch.load(REF / "txt_task_encoding.pth", map_location="cpu", weights_only=True).float()
    assert torch.equal(d["task_embeddings"][8], raw[10])  # MSD (key 10) is task id 8
    assert torch.equal(d["task_embeddings"][9], raw[8]) and torch.equal(d["task_embeddings"][10], raw[9])
    assert torch.equal(d["task_embeddings"][:8], raw[:8])
    assert d["task_names"][8] == "10" and d["task_prompts"][8] == PUBLISHED_TASK_PROMPTS["10"]
    raw_o = torch.load(REF / "txt_encoding.pth", map_location="cpu", weights_only=True).float()
    assert torch.equal(d["organ_embeddings"], raw_o)


@needs_ref
def test_precomputed_published_lookup():
    enc = build_text_encoder(f"precomputed:{REF}")
    assert isinstance(enc, PrecomputedEncoder) and enc.dim == 512 and len(enc) == 43
    d = reference_clip_embeddings(REF)
    e = enc.encode(["A computerized tomography of a Arota", "Aorta", "IVC", "postcava"])
    assert torch.equal(e[0], d["organ_embeddings"][7]) and torch.equal(e[1], e[0])
    assert torch.equal(e[2], d["organ_embeddings"][8]) and torch.equal(e[3], e[2])
    assert torch.equal(enc.encode([PUBLISHED_TASK_PROMPTS["10"]])[0], d["task_embeddings"][8])
    assert torch.equal(enc.encode(["10"])[0], d["task_embeddings"][8])
    with pytest.raises(MissingTextError, match="a photo of a cat"):
        enc.encode(["liver", "a photo of a cat"])
    organ_only = build_text_encoder(f"precomputed:{REF / 'txt_encoding.pth'}")
    assert len(organ_only) == 32 and "Kidney Cyst" in organ_only
    with pytest.raises(KeyError, match=PUBLISHED_TASK_PROMPTS["03"]):
        organ_only.encode([PUBLISHED_TASK_PROMPTS["03"]])
    task_only = build_text_encoder(f"precomputed:{REF / 'txt_task_encoding.pth'}")
    assert torch.equal(task_only.encode(["13"])[0], d["task_embeddings"][10])
    assert nearest_rois(enc, "IVC", k=2)[0].name == "inferior_vena_cava"


def test_precomputed_own_format(tmp_path):
    f = tmp_path / "p.pt"
    torch.save({"prompts": ["alpha", "beta"], "embeddings": torch.eye(2), "encoder": "toy"}, f)
    enc = build_text_encoder({"type": "precomputed", "path": str(f)})
    assert enc.name == "toy" and enc.dim == 2
    assert enc.encode(["beta", "Alpha"]).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(MissingTextError, match="'gamma'"):
        enc.encode(["gamma"])
    torch.save(torch.zeros(5, 3), tmp_path / "bad.pt")
    with pytest.raises(TextEncoderError, match=r"\[32, D\]"):
        build_text_encoder(f"precomputed:{tmp_path / 'bad.pt'}")


# --------------------------------------------------------------------------------------------- CLIP


@pytest.fixture()
def tiny_clip_name(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip import factory

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    name = "cdpdnet-test-tiny-clip"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    yield name
    factory._MODEL_CONFIGS.pop(name, None)
    factory._MODEL_CONFIG_PATHS[:] = [p for p in factory._MODEL_CONFIG_PATHS if p != tmp_path / f"{name}.json"]


def test_clip_encoder_from_local_state_dict(tiny_clip_name, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_name).eval()
    f = tmp_path / "clip.pt"
    torch.save(model.state_dict(), f)
    enc = build_text_encoder({"type": "clip", "weights": str(f), "model": tiny_clip_name})
    assert enc.dim == 32 and enc.name == f"clip:{f.resolve()}"
    texts = ["A computerized tomography of a Liver", "liver"]
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(tiny_clip_name)(texts))
    out = enc.encode(texts)
    assert out.shape == (2, 32) and torch.allclose(out, ref, atol=1e-5)  # not normalised by default
    norm = build_text_encoder({"type": "clip", "weights": str(f), "model": tiny_clip_name, "normalize": True})
    assert torch.allclose(norm.encode(texts).norm(dim=1), torch.ones(2), atol=1e-5)


def test_clip_errors():
    with pytest.raises(TextEncoderError, match="CLIP weights not found at '/nonexistent/clip.pt'.*minilm"):
        build_text_encoder("clip:/nonexistent/clip.pt")
    with pytest.raises(TextEncoderError, match="needs weights"):
        build_text_encoder("clip")


def test_clip_openai_offline_fails_fast():
    pytest.importorskip("open_clip")
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the tests run offline (tests/core/conftest.py sets HF_HUB_OFFLINE=1)"
    try:
        enc = build_text_encoder("clip:openai")
    except TextEncoderError as e:
        assert "offline" in str(e) and "minilm" in str(e)
    else:  # cached on this machine
        assert enc.dim == 512


# --------------------------------------------------------------------------------------------- factory


def test_factory_specs_and_errors(minilm, tmp_path):
    assert build_text_encoder(minilm) is minilm
    folder = default_minilm_folder()
    assert (folder / "config.json").is_file()
    with pytest.raises(TextEncoderError, match="'/nonexistent/st-folder' does not exist.*minilm"):
        build_text_encoder("minilm:/nonexistent/st-folder")
    with pytest.raises(TextEncoderError, match="has no config.json"):
        build_text_encoder(f"minilm:{tmp_path}")
    with pytest.raises(TextEncoderError, match="precomputed embeddings not found at '/nonexistent/e.pt'"):
        build_text_encoder("precomputed:/nonexistent/e.pt")
    with pytest.raises(TextEncoderError, match="unknown text encoder 'bert'.*minilm"):
        build_text_encoder("bert:/x")
    with pytest.raises(TextEncoderError, match="bad option"):
        build_text_encoder({"type": "minilm", "colour": "red"})
    with pytest.raises(TextEncoderError, match=r"no txt_encoding\.pth"):
        build_text_encoder(f"precomputed:{tmp_path}")


def test_minilm_local_folder():
    enc = build_text_encoder(f"minilm:{default_minilm_folder()}")
    assert enc.name.startswith("minilm:/") and enc.dim == 384 and enc.pooling == "mean"
