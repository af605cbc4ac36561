"""Training: checkpoints, resume, stop, fine-tuning, DDP (tiny preset, random DINO: plumbing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdpdnet.checkpoint import load_checkpoint
from cdpdnet.data import load_datalist, rarest_roi_weights
from cdpdnet.factory import model_from_checkpoint
from cdpdnet.phantoms import PHANTOM_SOURCES, write_phantom_dataset
from cdpdnet.preset import load_preset
from cdpdnet.taxonomy import ROIS, UnknownROIError
from cdpdnet.training import TrainConfig, Trainer, loss_from_preset, warmup_cosine_lr


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    path = write_phantom_dataset(tmp_path_factory.mktemp("ph"), n_per_source=1, n_heldout=1, spacing=(6, 6, 6))
    return path, load_datalist(path)


def _cfg(out, **kw):
    base = dict(out_dir=str(out), epochs=2, iterations_per_epoch=2, progress=False, num_samples=1)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_model_log_and_resumable_checkpoint(phantoms, tmp_path):
    _, dl = phantoms
    summary = Trainer(dl.training, "tiny", _cfg(tmp_path / "run")).run()
    assert summary["epochs_done"] == 2 and summary["stopped"] is None
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and all(x["iterations"] == 2 for x in lines)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and "optimizer" in ck
    loaded = model_from_checkpoint(summary["model"])
    assert [t["name"] for t in loaded.tasks] == list(PHANTOM_SOURCES)  # one task per source dataset
    assert "optimizer" not in load_checkpoint(summary["model"])

    # resume: continues at epoch 2 with the saved optimiser
    resumed = Trainer(dl.training, "tiny", _cfg(tmp_path / "run", epochs=3, resume=True))
    assert resumed.start_epoch == 2
    assert resumed.run()["epochs_done"] == 3
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_cpu_bf16_trains_under_autocast_where_the_cpu_has_bf16(phantoms, tmp_path):
    """``train.cpu_bf16``: the step runs under bf16 autocast on a CPU with native bf16 (and in float32 on
    one without, where the flag cannot help); the loss stays finite and the model, kept in float32, loads."""
    import torch

    from cdpdnet.device import use_bf16

    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"], d["train"]["cpu_bf16"] = "tiny-bf16", True
    (tmp_path / "p.json").write_text(json.dumps(d))
    tr = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run", device="cpu"))
    assert tr.amp == use_bf16(torch.device("cpu"), True)  # the project's one probe of the CPU's bf16
    assert not Trainer(dl.training, "tiny", _cfg(tmp_path / "plain", device="cpu")).amp
    summary = tr.run()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    loaded = model_from_checkpoint(summary["model"])
    assert all(p.dtype == torch.float32 for p in loaded.model.net.parameters())


def test_stop_flag_and_finetune_keep_tasks(phantoms, tmp_path):
    _, dl = phantoms
    first = Trainer(dl.training, "tiny", _cfg(tmp_path / "a", epochs=1, iterations_per_epoch=1)).run()
    calls = []
    tr = Trainer(dl.training[:2], "ignored", _cfg(tmp_path / "b", epochs=5, init_checkpoint=first["model"]),
                 should_stop=lambda: calls.append(1) or True)
    assert [t["name"] for t in tr.tasks] == list(PHANTOM_SOURCES)
    summary = tr.run()
    assert summary["stopped"] == "stop requested" and summary["epochs_done"] == 1 and len(calls) == 1
    assert os.path.isfile(summary["model"])


def test_deep_supervision_trains_and_round_trips(phantoms, tmp_path):
    """A preset with ``network.deep_supervision`` trains (the coarse heads get gradients) and its
    checkpoint rebuilds the same network."""
    import torch

    from cdpdnet.preset import load_preset

    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"], d["network"]["deep_supervision"] = "tiny-ds", 2
    (tmp_path / "tiny-ds.json").write_text(json.dumps(d))
    tr = Trainer(dl.training, str(tmp_path / "tiny-ds.json"), _cfg(tmp_path / "run", epochs=2, iterations_per_epoch=1))
    before = [h.weight.detach().clone() for h in tr.model.net.aux_outputs]
    summary = tr.run()
    assert all(not torch.equal(b, h.weight) for b, h in zip(before, tr.model.net.aux_outputs))
    loaded = model_from_checkpoint(summary["model"])
    assert loaded.preset.network.deep_supervision == 2
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(loaded.model.net.aux_outputs, tr.model.net.aux_outputs))


def _lesion_mask():
    return [r.is_lesion for r in ROIS]


# an option that works only with another one set
_LOSS_OPTIONS_NEEDED = {"unannotated_cap": {"unannotated_weight": 0.1}}


@pytest.mark.parametrize("key, good, bad, message, applied", [
    ("log_dice", True, "yes", "train.log_dice must be true or false", lambda f: f.log_dice),
    ("focal_gamma", 2.0, -1.0, "train.focal_gamma must be a number >= 0", lambda f: f.focal_gamma == 2.0),
    ("focal_on", "lesions", "organs", "train.focal_on must be 'all' or 'lesions'",
     lambda f: f.focal_channels is not None and f.focal_channels.tolist() == _lesion_mask()),
    ("bce_pos_fraction", 0.01, 1.0, r"train.bce_pos_fraction must be a number in \[0, 1\)",
     lambda f: f.pos_fraction == 0.01),
    ("bce_pos_on", "lesions", "tumours", "train.bce_pos_on must be 'all' or 'lesions'",
     lambda f: f.pos_channels is not None and f.pos_channels.tolist() == _lesion_mask()),
    ("bce_pos_fraction_lesions", 0.05, -0.5, r"train.bce_pos_fraction_lesions must be a number in \[0, 1\)",
     lambda f: [round(float(v), 4) for v in f.pos_fraction] == [0.05 if les else 0.0 for les in _lesion_mask()]),
    ("bce_pos_fraction_rois", {"lung_tumor": 0.05}, {"lung_tumor": 1.5},
     r"train.bce_pos_fraction_rois\['lung_tumor'\] must be a number in \[0, 1\)",
     lambda f: [round(float(v), 4) for v in f.pos_fraction] == [0.05 if r.name == "lung_tumor" else 0.0 for r in ROIS]),
    ("roi_loss_weights", {"lung tumour": 10}, {"lung_tumor": 0},
     r"train.roi_loss_weights\['lung_tumor'\] must be a weight > 0",
     lambda f: f.pair_weights.tolist() == [10.0 if r.name == "lung_tumor" else 1.0 for r in ROIS]),
    ("exclusion_weight", 0.5, "on", r"train.exclusion_weight must be a number >= 0",
     lambda f: f.exclusion_weight == 0.5 and f.exclusion is not None and int(f.exclusion.sum()) > 0),
    ("unannotated_weight", 0.1, -0.1, r"train.unannotated_weight must be a number >= 0",
     lambda f: f.unannotated_weight == 0.1),
    ("unannotated_cap", 0.01, 2, r"train.unannotated_cap must be a number in \[0, 1\]",
     lambda f: f.unannotated_cap == 0.01),
])
def test_loss_options_from_the_preset(phantoms, tmp_path, key, good, bad, message, applied):
    """``train.log_dice`` / ``focal_gamma`` / ``focal_on`` / ``bce_pos_fraction`` / ``bce_pos_on`` /
    ``bce_pos_fraction_lesions`` / ``bce_pos_fraction_rois`` / ``roi_loss_weights`` / ``exclusion_weight`` /
    ``unannotated_weight`` / ``unannotated_cap`` reach the loss the
    trainer uses (off by default); a bad value (or an unknown ROI) is refused with a message that names it."""
    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"] = "tiny-loss"
    d["train"].update(_LOSS_OPTIONS_NEEDED.get(key, {}))
    for value in (good, bad):
        d["train"][key] = value
        (tmp_path / "p.json").write_text(json.dumps(d))
        if value is good:
            assert applied(Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run")).loss_fn)
        else:
            with pytest.raises(ValueError, match=message):
                Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run"))
    plain = Trainer(dl.training, "tiny", _cfg(tmp_path / "run")).loss_fn
    assert not plain.log_dice and plain.focal_gamma == 0.0 and plain.focal_channels is None and plain.pos_fraction == 0
    assert plain.pos_channels is None and plain.exclusion is None and plain.pair_weights is None
    assert plain.unannotated_weight == 0 and plain.unannotated_cap == 0


BENCH_PRESETS = Path(__file__).parents[2] / "bench" / "presets"


@pytest.mark.parametrize("path", sorted(BENCH_PRESETS.glob("*.json")),
                         ids=lambda p: p.stem)
def test_benchmark_presets_load_with_their_loss(path):
    """Every experiment preset that docs/benchmarks.md names (``bench/presets/*.json``) still loads and
    builds the loss it was measured with, so its documented command runs."""
    preset = load_preset(str(path))
    assert preset.name == path.stem
    loss_from_preset(preset.train)


def _bench(stem: str):
    """A benchmark experiment preset (``bench/presets/STEM.json``)."""
    return load_preset(str(BENCH_PRESETS / f"{stem}.json"))


def _without(preset, *paths: tuple[str, str]) -> dict:
    """A preset's settings without its name, description and the given ``(section, key)`` entries."""
    d = preset.to_dict()
    d.pop("name"), d.pop("description")
    for section, key in paths:
        d[section].pop(key, None)
    return d


def test_preset_to_dict_is_a_copy():
    """Editing ``Preset.to_dict()`` (as a script that derives a preset does) leaves the preset unchanged."""
    preset = load_preset("lite-wide")
    d = preset.to_dict()
    d["train"]["roi_loss_weights"]["liver"] = 9
    d["infer"]["threshold"] = 0.9
    assert preset.train["roi_loss_weights"] == {"hepatic_vessel_tumor": 3, "colon_tumor": 2}
    assert preset.infer["threshold"] == 0.4


def test_previous_lite_wide_presets_differ_only_in_what_changed_since():
    """``bench/presets/lite-wide-v10.json`` is ``lite-wide`` before it read each volume on 4 half-voxel shifted
    grids at inference, ``lite-wide-v9.json`` is v10 before its soft-tissue window was filtered before
    the resampling, ``lite-wide-v8.json`` is v9 before the lung tumour's mirrored pass at
    inference, ``lite-wide-v7.json`` is v8 before bf16 training with the head in float32,
    ``lite-wide-v6.json`` v7 before the colon tumour's pair weight 2, ``lite-wide-v5.json`` before the hepatic vessel tumour's pair weight (every ROI at weight 1) and
    ``lite-wide-v4.json`` is v5 with the 32-wide head, so the presets measured against each keep what
    they were measured with."""
    current, v10 = load_preset("lite-wide"), _bench("lite-wide-v10")
    sg = ("infer", "subgrids")
    assert (current.infer["subgrids"], v10.infer["subgrids"]) == (4, 1)
    assert _without(current, sg) == _without(v10, sg)
    latest, v7, v6, v5, v4 = (v10, _bench("lite-wide-v7"), _bench("lite-wide-v6"),
                              _bench("lite-wide-v5"), _bench("lite-wide-v4"))
    v9, now = _bench("lite-wide-v9"), _bench("lite-wide-v8")
    for older in (v9, now, v7, _bench("lite-wide-aam"), _bench("lite-wide-aa")):
        assert older.infer["subgrids"] == 1
    aa = ("preprocess", "anti_alias")
    assert (latest.preprocess["anti_alias"], v9.preprocess["anti_alias"], now.preprocess["anti_alias"]) == ("main", False, False)
    assert _without(latest, aa) == _without(v9, aa)
    assert _without(_bench("lite-wide-aam")) == _without(latest)  # the experiment that was adopted
    assert _bench("lite-wide-aa").preprocess["anti_alias"] is True and _without(_bench("lite-wide-aa"), aa) == _without(v9, aa)
    assert (v9.infer["lesion_mirror"], v9.infer["lesion_mirror_rois"]) == ("max", ["lung_tumor"])
    assert now.infer["lesion_mirror"] == "off" and v7.infer["lesion_mirror"] == "off"
    assert _without(v9, ("infer", "lesion_mirror")) == _without(now, ("infer", "lesion_mirror"))
    bf16 = (("network", "head_float32"), ("train", "cpu_bf16"))
    assert (now.network.head_float32, now.train["cpu_bf16"]) == (True, True)
    assert (v7.network.head_float32, v7.train["cpu_bf16"]) == (False, False)
    assert _without(now, *bf16) == _without(v7, *bf16)
    assert _without(_bench("lite-wide-bf16h")) == _without(now)  # the experiment that was adopted
    assert _without(_bench("lite-wide-bf16"), ("train", "cpu_bf16")) == _without(v7, ("train", "cpu_bf16"))
    for stem in ("lite-wide-v6", "lite-wide-bs1", "lite-wide-bs3", "lite-wide-ctw2"):
        assert not _bench(stem).train["cpu_bf16"] and not _bench(stem).network.head_float32, stem
    assert v7.train["roi_loss_weights"] == {"hepatic_vessel_tumor": 3, "colon_tumor": 2}
    assert v6.train["roi_loss_weights"] == {"hepatic_vessel_tumor": 3}
    assert not v5.train["roi_loss_weights"]
    for a, b in ((v7, v6), (v6, v5)):
        assert _without(a, ("train", "roi_loss_weights")) == _without(b, ("train", "roi_loss_weights"))
    assert (v5.network.head_hidden, v4.network.head_hidden) == (64, 32)
    assert _without(v5, ("network", "head_hidden")) == _without(v4, ("network", "head_hidden"))
    for stem in ("lite-wide-v3", "lite-wide-ltw10", "lite-wide-ltw3", "lite-wide-ltw10-decay", "lite-wide-ltpos05"):
        assert _bench(stem).network.head_hidden == 32, stem
    for stem in ("lite-wide-hh64", "lite-wide-hh128"):
        assert not _bench(stem).train.get("roi_loss_weights"), stem
    assert _bench("lite-wide-hvtw3").train == v6.train
    assert _bench("lite-wide-ctw2").train == v7.train  # the experiment that was adopted then
    assert _bench("lite-wide-ctw3").train["roi_loss_weights"] == {"hepatic_vessel_tumor": 3, "colon_tumor": 3}


def test_roi_loss_weights_decay_to_one_over_the_given_fraction(phantoms, tmp_path):
    """``train.roi_loss_weights_decay``: the ROI weights fall linearly from the preset's values to 1 over
    that fraction of the run (here half of 2 x 2 iterations), then stay at 1; without it they stay; a
    fraction outside [0, 1], or a decay without weights, is refused."""
    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"] = "tiny-decay"
    d["train"].update(roi_loss_weights={"liver": 9}, roi_loss_weights_decay=0.5)
    (tmp_path / "p.json").write_text(json.dumps(d))
    trainer = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run"))
    liver = [r.name for r in ROIS].index("liver")
    for done, weight in ((0.0, 9.0), (0.25, 5.0), (0.5, 1.0), (0.9, 1.0)):
        trainer.decay_pair_weights(done)
        assert float(trainer.loss_fn.pair_weights[liver]) == pytest.approx(weight)
        assert float(trainer.loss_fn.pair_weights.sum()) == pytest.approx(len(ROIS) - 1 + weight)
    trainer.decay_pair_weights(0.0)
    trainer.run()  # the last steps are past half the run
    assert float(trainer.loss_fn.pair_weights[liver]) == pytest.approx(1.0)
    del d["train"]["roi_loss_weights_decay"]
    (tmp_path / "p.json").write_text(json.dumps(d))
    kept = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run2"))
    kept.run()
    assert float(kept.loss_fn.pair_weights[liver]) == 9.0
    d["train"]["roi_loss_weights_decay"] = 1.5
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"train.roi_loss_weights_decay must be a fraction of the run in \[0, 1\]"):
        Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run3"))
    del d["train"]["roi_loss_weights"]
    d["train"]["roi_loss_weights_decay"] = 0.5
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="train.roi_loss_weights_decay needs train.roi_loss_weights"):
        Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run4"))


def test_per_roi_positive_weight_names_an_unknown_roi():
    """``train.bce_pos_fraction_rois``: a name outside the taxonomy is refused with the closest names; a
    synonym resolves; the entries sit above the lesions' fraction, the default and ``bce_pos_on``."""
    with pytest.raises(UnknownROIError, match="unknown ROI 'lung nodulez'; closest: lung_tumor"):
        loss_from_preset({"bce_pos_fraction": 0.01, "bce_pos_fraction_rois": {"lung nodulez": 0.05}})
    f = loss_from_preset({"bce_pos_fraction": 0.01, "bce_pos_fraction_lesions": 0.02,
                          "bce_pos_fraction_rois": {"lung tumour": 0.05}}).pos_fraction  # synonyms resolve
    assert [round(float(v), 4) for v in f] == [0.05 if r.name == "lung_tumor" else 0.02 if r.is_lesion else 0.01
                                                for r in ROIS]
    # an organ named there is weighted even when bce_pos_on leaves the organs out
    loss = loss_from_preset({"bce_pos_fraction": 0.01, "bce_pos_on": "lesions", "bce_pos_fraction_rois": {"liver": 0.02}})
    assert [round(float(v), 4) for v in loss.pos_fraction] == [0.02 if r.name == "liver" else 0.01 if r.is_lesion else 0.0
                                                           for r in ROIS]


def test_refuses_unlabelled_samples(phantoms):
    _, dl = phantoms
    s = dl.training[0]
    bad = type(s)(image=s.image, label=None, annotated=(), source="x")
    with pytest.raises(ValueError, match="no label"):
        Trainer([bad], "tiny", _cfg("/tmp/never"))


def test_lr_schedule_matches_reference():
    # reference 4: epoch 0 = 8.16e-6, 500 = 2.16e-4, 900 = 1.06e-5, 999 = 0 (stepped at epoch start)
    lrs = [warmup_cosine_lr(e + 1, 4e-4, 50, 1000) for e in (0, 499, 899, 999)]
    assert lrs[0] == pytest.approx(8.16e-6, rel=1e-3) and lrs[1] == pytest.approx(2.16e-4, rel=1e-2)
    assert lrs[2] == pytest.approx(1.06e-5, rel=3e-2) and lrs[3] == 0.0


@pytest.mark.slow
def test_tiny_model_learns_on_phantoms(phantoms, tmp_path):
    """Loss falls over 60 iterations (the lite preset's real learning figures: bench/learning_phantoms.py)."""
    _, dl = phantoms
    Trainer(dl.training, "tiny", _cfg(tmp_path / "r", epochs=6, iterations_per_epoch=10, lr=3e-3)).run()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_torchrun_ddp_only_rank0_writes(phantoms, tmp_path):
    path, _ = phantoms
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "cdpdnet",
           "train", "--data", str(path), "--preset", "tiny", "--out", str(out), "--epochs", "1", "--iterations", "2",
           "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one writer
    assert (out / "model.pt").is_file()


def test_finetune_schedule_never_reaches_zero(phantoms, tmp_path):
    _, dl = phantoms
    tr = Trainer(dl.training, "tiny", _cfg(tmp_path / "ft", epochs=2, schedule="finetune", lr=1e-3))
    assert tr._lr_for(0) == pytest.approx(1e-3) and tr._lr_for(1) >= 1e-4
    ref = Trainer(dl.training, "tiny", _cfg(tmp_path / "ref", epochs=2, lr=1e-3))
    assert ref._lr_for(1) == 0.0  # the published schedule ends at 0
    with pytest.raises(ValueError, match="unknown schedule"):
        Trainer(dl.training, "tiny", _cfg(tmp_path / "x", schedule="linear"))


def test_budget_schedule_anneals_over_the_time_budget(phantoms, tmp_path, monkeypatch):
    """``schedule="budget"``: warm-up, peak, then cosine to 0 as the time budget runs out."""
    import cdpdnet.training as training

    _, dl = phantoms
    with pytest.raises(ValueError, match="time budget"):
        Trainer(dl.training, "tiny", _cfg(tmp_path / "nobudget", schedule="budget"))
    tr = Trainer(dl.training, "tiny", _cfg(tmp_path / "b", schedule="budget", max_minutes=10, lr=1e-3))
    deadline = 1000.0 + 600.0
    lrs = []
    for elapsed in (0.0, 60.0, 300.0, 599.0, 700.0):
        monkeypatch.setattr(training.time, "monotonic", lambda e=elapsed: 1000.0 + e)
        lrs.append(tr._budget_lr(deadline))
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at 10 %
    assert lrs[1] > 0.9e-3 and lrs[2] == pytest.approx(0.5e-3, rel=0.05)
    assert lrs[3] < 1e-5 and lrs[4] == 0.0
    assert all(g["lr"] == 0.0 for g in tr.optimizer.param_groups)


def _crops_containing(policy: str, sample, roi_value: int, n: int = 24, lesion_ratio: float = 1.0) -> float:
    """Fraction of training crops (``tiny`` preset, crop policy ``policy``) that contain ROI ``roi_value``."""
    import numpy as np

    from cdpdnet.data import annotated_vector
    from cdpdnet.preset import load_preset
    from cdpdnet.training import _CaseCache, _RandomCrops

    preset = load_preset("tiny", {"train": {"crop": policy, "background_ratio": 0.0, "lesion_ratio": lesion_ratio}})
    d = _CaseCache(preset)({"image": sample.image, "label": sample.label})
    d.update(annotated=annotated_vector(sample.annotated), task_id=0)
    crops = _RandomCrops(preset, num_samples=n, seed=0)(d)
    return float(np.mean([c["target"][roi_value - 1].any().item() for c in crops]))


def test_class_balanced_crops_reach_small_rois(phantoms):
    """``train.crop = "classes"`` centres crops on annotated ROIs drawn uniformly, so a small ROI is
    seen as often as a big one; the reference's pos/neg crops follow the voxel counts."""
    from cdpdnet.taxonomy import roi

    _, dl = phantoms
    s = next(x for x in dl.training if x.source == "phantom_btcv")
    liver, adrenal = roi("liver").index, roi("adrenal_gland_left").index
    sample = type(s)(image=s.image, label=s.label, annotated=(liver, adrenal), source=s.source)
    balanced = _crops_containing("classes", sample, adrenal)
    posneg = _crops_containing("posneg", sample, adrenal)
    assert balanced >= 0.4 and balanced > posneg
    with pytest.raises(ValueError, match="crop policy"):
        _crops_containing("everything", sample, adrenal)


def test_lesion_ratio_weights_crops_towards_lesions(phantoms):
    """``train.lesion_ratio`` > 1 centres more of the class-balanced crops on annotated lesions."""
    import numpy as np

    from cdpdnet.data import annotated_vector
    from cdpdnet.preset import load_preset
    from cdpdnet.taxonomy import roi
    from cdpdnet.training import _CaseCache, _RandomCrops

    _, dl = phantoms
    s = next(x for x in dl.training if x.source == "phantom_kidney")
    lesions = [roi("kidney_tumor").index, roi("kidney_cyst").index]
    annotated = annotated_vector([roi(n).index for n in ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst")])

    def with_lesion(lesion_ratio: float) -> float:  # small crops: holding a lesion ~ centred on one
        preset = load_preset("tiny", {"patch_size": [16, 8, 8],
                                      "train": {"crop": "classes", "background_ratio": 0.0, "lesion_ratio": lesion_ratio}})
        d = _CaseCache(preset)({"image": s.image, "label": s.label})
        d.update(annotated=annotated, task_id=0)
        crops = _RandomCrops(preset, num_samples=128, seed=0)(d)
        return float(np.mean([any(bool(c["target"][v - 1].any()) for v in lesions) for c in crops]))

    plain, weighted = with_lesion(1.0), with_lesion(8.0)
    # centred on a lesion: 2 of 4 crops, then 16 of 18; the crops without a lesion at least halve
    assert 1.0 - weighted < 0.5 * (1.0 - plain), (plain, weighted)


def test_roi_crop_weights_favour_single_rois(phantoms):
    """``train.roi_crop_weights`` multiplies the crop weight of the named ROIs (names or synonyms);
    an unknown name or a negative weight is refused."""
    import numpy as np

    from cdpdnet.data import annotated_vector
    from cdpdnet.preset import load_preset
    from cdpdnet.taxonomy import UnknownROIError, roi
    from cdpdnet.training import _CaseCache, _RandomCrops

    _, dl = phantoms
    s = next(x for x in dl.training if x.source == "phantom_kidney")
    cyst = roi("kidney_cyst").index
    annotated = annotated_vector([roi(n).index for n in ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst")])

    def preset(weights: dict):
        return load_preset("tiny", {"patch_size": [16, 8, 8], "train": {
            "crop": "classes", "background_ratio": 0.0, "roi_crop_weights": weights}})

    def crops(weights: dict):
        return _RandomCrops(preset(weights), num_samples=128, seed=0)

    def with_cyst(weights: dict) -> float:
        d = _CaseCache(preset(weights))({"image": s.image, "label": s.label})
        d.update(annotated=annotated, task_id=0)
        return float(np.mean([bool(c["target"][cyst - 1].any()) for c in crops(weights)(d)]))

    plain, weighted = with_cyst({}), with_cyst({"renal cyst": 9.0})  # 1 of 4 crops centred on it, then 9 of 12
    assert 1.0 - weighted < 0.5 * (1.0 - plain), (plain, weighted)
    with pytest.raises(UnknownROIError):
        crops({"kidney_cist_x": 2.0})
    with pytest.raises(ValueError, match="must be a weight >= 0"):
        crops({"kidney_cyst": -1.0})


def test_crop_roi_weighting_rarity_centres_crops_on_the_rois_few_sources_annotate(phantoms):
    """``train.crop_roi_weighting`` ``"rarity"`` divides each annotated ROI's crop weight by the number of
    sources that annotate it and rescales them to their plain sum, so a source's rare ROIs get the crops
    of its common ones and the background share stays; it needs the class-balanced crops."""
    import numpy as np

    from cdpdnet.data import annotated_vector
    from cdpdnet.preset import load_preset
    from cdpdnet.taxonomy import roi
    from cdpdnet.training import _CaseCache, _RandomCrops

    _, dl = phantoms
    s = next(x for x in dl.training if x.source == "phantom_kidney")
    names = ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst")
    values = [roi(n).index for n in names]
    counts = dict(zip(values, (9, 9, 1, 1)))  # the kidneys annotated by nine sources, the lesions by one

    def sampled(weighting: str) -> tuple[list[float], float]:
        preset = load_preset("tiny", {"patch_size": [16, 8, 8], "train": {
            "crop": "classes", "background_ratio": 0.5, "crop_roi_weighting": weighting}})
        d = _CaseCache(preset)({"image": s.image, "label": s.label})
        d.update(annotated=annotated_vector(values), task_id=0)
        crops = _RandomCrops(preset, num_samples=128, seed=0, roi_sources=counts)
        out = crops(d)
        with_lesion = np.mean([any(bool(c["target"][v - 1].any()) for v in values[2:]) for c in out])
        return list(crops.balanced.cropper.ratios), float(with_lesion)

    plain, plain_lesion = sampled("uniform")
    rare, rare_lesion = sampled("rarity")
    ratio = {v: rare[v] for v in values}
    assert rare[0] == plain[0] == 0.5 and np.isclose(sum(ratio.values()), 4.0)  # background share kept
    # 1/9, 1/9, 1, 1 rescaled to sum to 4: 0.2 for each kidney, 1.8 for each lesion
    assert np.allclose([ratio[v] for v in values], [0.2, 0.2, 1.8, 1.8])
    assert [plain[v] for v in values] == [1.0] * 4
    # centred on a lesion: 2 of 4.5 weights, then 3.6 of 4.5; the crops without a lesion fall by a quarter or more
    assert 1.0 - rare_lesion < 0.75 * (1.0 - plain_lesion), (plain_lesion, rare_lesion)


def test_train_crop_roi_weighting_counts_the_training_sources_and_a_wrong_setting_is_named(phantoms, tmp_path):
    """The trainer gives the crop sampler the number of its sources that annotate each ROI; an unknown
    ``train.crop_roi_weighting`` or ``"rarity"`` with the reference's pos/neg crops stops the run before
    its first step, naming the setting."""
    from collections import Counter

    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"] = "tiny-rare-crops"
    d["train"].update(crop="classes", crop_roi_weighting="rarity")
    (tmp_path / "p.json").write_text(json.dumps(d))
    crops = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run"))._dataset().transform.crops
    rois = {c.source: set() for c in dl.training}
    for c in dl.training:
        rois[c.source] |= set(c.annotated)
    counts = Counter(r for v in rois.values() for r in v)
    assert len(set(counts.values())) > 1  # some ROIs are annotated by more sources than others
    assert np.allclose(crops.roi_rarity, [1.0 / counts.get(v, 1) for v in range(1, 33)])
    assert Trainer(dl.training, "tiny", _cfg(tmp_path / "plain"))._dataset().transform.crops.roi_rarity is None
    for setting, message in (({"crop_roi_weighting": "rare"}, r"crop_roi_weighting must be one of \('uniform', 'rarity'\), got 'rare'"),
                             ({"crop": "posneg"}, r"crop_roi_weighting='rarity' weights the class-balanced crops: "
                                                  r"set train.crop to 'classes' \(it is 'posneg'\)")):
        d["train"].update({"crop": "classes", "crop_roi_weighting": "rarity", **setting})
        (tmp_path / "q.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match=message):
            Trainer(dl.training, str(tmp_path / "q.json"), _cfg(tmp_path / "bad")).run()
        assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def _augmenter(train: dict, seed: int = 0):
    from cdpdnet.preset import load_preset
    from cdpdnet.training import _RandomCrops

    return _RandomCrops(load_preset("tiny", {"patch_size": [24, 24, 24], "train": train}), num_samples=1, seed=seed)


def _cube_crop():
    import torch

    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 8:16, 8:16, 8:16] = 6
    image = label.float() / 6.0
    return {"image": image, "label": label}


def test_zoom_magnifies_only_the_chosen_sources():
    """The reference's RandZoom (1.3-1.5, MSD keys only): an 8-voxel cube at the centre of a crop grows
    to 10-12 voxels for a listed source and stays 8 for any other; the label stays a label."""
    import numpy as np

    aug = _augmenter({"zoom_prob": 1.0, "zoom_range": [1.3, 1.5], "zoom_sources": ["10_03"],
                      "rot90_prob": 0.0, "shift_intensity_prob": 0.0})

    def width(source):
        lab = np.asarray(aug.augment(_cube_crop(), source)["label"])[0]
        assert set(np.unique(lab)) == {0, 6} and lab.shape == (24, 24, 24)
        return int((lab[:, 12, 12] == 6).sum())

    assert width("01") == 8
    assert 10 <= width("10_03") <= 12


def test_affine_and_contrast_augmentation_keep_labels_and_shapes():
    """Rotation/scaling moves label and image together (nearest for the label, no new values);
    contrast scaling changes intensities only."""
    import numpy as np

    aug = _augmenter({"affine_prob": 1.0, "affine_rotate": [0.0, 0.0, 0.5], "affine_scale": 0.2,
                      "scale_intensity": 0.3, "scale_intensity_prob": 1.0, "rot90_prob": 0.0, "shift_intensity_prob": 0.0})
    out = aug.augment(_cube_crop(), "01")
    img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
    assert img.shape == lab.shape == (24, 24, 24) and set(np.unique(lab)) <= {0, 6}
    assert abs(int((lab == 6).sum()) - 512) < 512 * 0.8 and not np.array_equal(lab == 6, np.asarray(_cube_crop()["label"])[0] == 6)
    inside = img[lab == 6]
    assert inside.size and 0.7 - 1e-6 <= np.median(inside) <= 1.3 + 1e-6 and np.median(inside) != 1.0


def test_fixed_mean_contrast_scales_tissue_differences_and_keeps_mean_and_range():
    """``train.contrast_fixed_mean`` (nnU-Net's contrast augmentation): a crop's intensities move away
    from or towards its mean by 1 + f, so the difference between two tissues (a vessel and its liver)
    scales by the same factor; the mean stays, values stay in the crop's range, the label is untouched."""
    import numpy as np

    crop = _cube_crop()
    crop["image"] = crop["image"] * 0.3 + 0.5  # two tissues, 0.5 and 0.8: no clipping at either factor's end
    before = np.asarray(crop["image"])[0]
    seen = []
    for seed in range(6):
        aug = _augmenter({"contrast_fixed_mean": [-0.4, -0.2], "contrast_fixed_mean_prob": 1.0,
                          "rot90_prob": 0.0, "shift_intensity_prob": 0.0}, seed=seed)
        out = aug.augment({k: v.clone() for k, v in crop.items()}, "01")
        img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
        assert np.array_equal(lab, np.asarray(crop["label"])[0])
        ratio = (img[lab == 6].mean() - img[lab == 0].mean()) / (before[lab == 6].mean() - before[lab == 0].mean())
        assert 0.6 - 1e-5 <= ratio <= 0.8 + 1e-5
        assert abs(img.mean() - before.mean()) < 1e-5 and img.min() >= 0.5 - 1e-6 and img.max() <= 0.8 + 1e-6
        seen.append(round(float(ratio), 4))
    assert len(set(seen)) > 1  # drawn per crop, not one fixed factor
    off = _augmenter({"rot90_prob": 0.0, "shift_intensity_prob": 0.0}).augment({k: v.clone() for k, v in crop.items()}, "01")
    assert np.array_equal(np.asarray(off["image"])[0], before)  # off by default


@pytest.mark.parametrize("train, message", [
    ({"contrast_fixed_mean": [-1.0, 0.0]}, r"train.contrast_fixed_mean must be .* got \[-1.0, 0.0\]"),
    ({"contrast_fixed_mean": [0.2, -0.2]}, r"train.contrast_fixed_mean must be .* got \[0.2, -0.2\]"),
    ({"contrast_fixed_mean": "strong"}, r"train.contrast_fixed_mean must be .* got 'strong'"),
    ({"contrast_fixed_mean": 0.3, "contrast_fixed_mean_prob": 2}, r"train.contrast_fixed_mean_prob must be a probability"),
])
def test_fixed_mean_contrast_refuses_factors_that_would_flatten_or_invert_a_crop(train, message):
    with pytest.raises(ValueError, match=message):
        _augmenter({"rot90_prob": 0.0, "shift_intensity_prob": 0.0, **train})


def test_lesion_mirror_prob_mirrors_lesion_crops_and_keeps_only_their_lesions_annotated():
    """``train.lesion_mirror_prob`` (off in every preset): a crop of a case that annotates a lesion is
    mirrored left-right with that probability, and only its lesions stay annotated (a mirrored torso
    must not teach an organ channel, its liver being on the wrong side); a case without a lesion is
    never mirrored; a probability outside [0, 1] or an orientation without a left-right axis is refused."""
    import numpy as np
    import torch

    from cdpdnet.data import annotated_vector
    from cdpdnet.taxonomy import roi
    from cdpdnet.training import _RandomCrops

    liver, tumour, kidney = roi("liver").index, roi("liver_tumor").index, roi("kidney_right").index
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 2:10, 4:20, 4:20] = liver  # one side of the left-right axis (0 in RAS)
    label[0, 4:7, 8:11, 8:11] = tumour
    case = {"image": label.float() / 30.0, "label": label, "task_id": 0,
            "classes": torch.as_tensor(np.where(label > 0, 1 + (label == tumour), 0).astype(np.uint8))}

    def crops(prob: float, annotated, n: int = 40, **pre):
        preset = load_preset("tiny", {"patch_size": [24, 24, 24], "preprocess": pre, "train": {
            "lesion_mirror_prob": prob, "shift_intensity_prob": 0.0}})
        return _RandomCrops(preset, num_samples=n, seed=0)(dict(case, annotated=annotated_vector(annotated)))

    def mirrored(c) -> bool:  # the whole volume is the crop: the liver is where it was or mirrored
        organ = np.asarray(c["image"][0]) > 0.1
        assert organ.sum() == 8 * 16 * 16
        return bool(organ[14:22].any())

    with_lesion = crops(0.5, [liver, tumour])
    flags = [mirrored(c) for c in with_lesion]
    assert 8 < sum(flags) < 32  # about half of 40
    for c, m in zip(with_lesion, flags):
        on = sorted(int(v) + 1 for v in np.flatnonzero(np.asarray(c["annotated"])))
        assert on == ([tumour] if m else [liver, tumour])
        t = np.asarray(c["target"][tumour - 1]).astype(bool)
        assert t[17:20].any() == m and t[4:7].any() != m
    assert not any(mirrored(c) for c in crops(1.0, [liver, kidney]))  # no lesion annotated: never mirrored
    assert not any(mirrored(c) for c in crops(0.0, [liver, tumour]))  # off: as before
    with pytest.raises(ValueError, match=r"train.lesion_mirror_prob must be a probability in \[0, 1\], got 1.5"):
        crops(1.5, [liver, tumour])
    with pytest.raises(ValueError, match="no left-right axis"):
        crops(0.5, [liver, tumour], orientation="SPI")


def test_lesion_mirror_labels_swap_sides_keeps_every_roi_annotated_with_left_and_right_swapped():
    """``train.lesion_mirror_labels: "swap_sides"``: a mirrored crop keeps every ROI its case annotates,
    and each left/right pair swaps labels and annotated flags (the kidney now on the patient's right is
    the right kidney); the liver and its tumour keep theirs, on the other side; an unmirrored crop is as
    it was; an unknown mode is refused by name."""
    import numpy as np
    import torch

    from cdpdnet.data import annotated_vector
    from cdpdnet.taxonomy import roi
    from cdpdnet.training import _RandomCrops

    liver, tumour = roi("liver").index, roi("liver_tumor").index
    k_right, k_left, lung_left = roi("kidney_right").index, roi("kidney_left").index, roi("lung_left").index
    label = torch.zeros(1, 24, 24, 24, dtype=torch.uint8)
    label[0, 2:10, 4:20, 4:20] = liver
    label[0, 4:7, 8:11, 8:11] = tumour
    label[0, 16:21, 20:23, 2:6] = k_right  # RAS: axis 0 runs from the patient's left to the right
    label[0, 3:8, 20:23, 2:6] = k_left
    case = {"image": (label == liver).float(), "label": label, "task_id": 0,
            "classes": torch.as_tensor(np.where(label > 0, 1 + (label == tumour), 0).astype(np.uint8))}
    annotated = annotated_vector([liver, tumour, k_right, k_left])

    def crops(**train):
        preset = load_preset("tiny", {"patch_size": [24, 24, 24], "train": dict(
            {"lesion_mirror_prob": 0.5, "shift_intensity_prob": 0.0}, **train)})
        return _RandomCrops(preset, num_samples=40, seed=0)(dict(case, annotated=annotated))

    out = crops(lesion_mirror_labels="swap_sides")
    flags = [bool(np.asarray(c["image"][0])[14:22].any()) for c in out]
    assert 8 < sum(flags) < 32
    for c, m in zip(out, flags):
        on = sorted(int(v) + 1 for v in np.flatnonzero(np.asarray(c["annotated"])))
        assert on == sorted([liver, tumour, k_right, k_left])  # lung_left stays unannotated either way
        assert not np.asarray(c["annotated"])[lung_left - 1]
        target = np.asarray(c["target"]).astype(bool)
        right_side, left_side = slice(16, 21), slice(3, 8)
        # mirrored or not, the right kidney's channel holds the kidney on the patient's right
        assert target[k_right - 1][right_side].sum() == target[k_right - 1].sum() == 5 * 3 * 4
        assert target[k_left - 1][left_side].sum() == target[k_left - 1].sum() == 5 * 3 * 4
        assert target[liver - 1][14:22].any() == m and target[tumour - 1][17:20].any() == m
    with pytest.raises(ValueError, match="lesion_mirror_labels must be 'lesions' or 'swap_sides', got 'both'"):
        crops(lesion_mirror_labels="both")


def test_train_source_weights_reach_the_sampler_and_a_wrong_source_is_named(phantoms, tmp_path):
    """``train.source_weights`` (off in every preset) draws a weighted source's crops more often; a
    source the data does not have stops the run before its first step, naming the sources there are."""
    from collections import Counter

    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"], d["train"]["source_weights"] = "tiny-sw", {"phantom_liver": 4}
    (tmp_path / "p.json").write_text(json.dumps(d))
    ds = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run", iterations_per_epoch=500))._dataset()
    counts = Counter(ds.pick(i).source for i in range(len(ds)))
    assert counts.most_common(1)[0][0] == "phantom_liver" and counts["phantom_liver"] > 2.5 * counts["phantom_btcv"]
    d["train"]["source_weights"] = {"phantom_lung": 2}
    (tmp_path / "q.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"sources without samples: \['phantom_lung'\]; the sources are \['phantom_btcv'"):
        Trainer(dl.training, str(tmp_path / "q.json"), _cfg(tmp_path / "bad")).run()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_train_source_sampling_reaches_the_sampler_and_a_wrong_value_is_named(phantoms, tmp_path):
    """``train.source_sampling`` ``"rarest_roi"`` (off in every preset) draws the sources by
    :func:`cdpdnet.data.rarest_roi_weights` of what they annotate; a value it does not know stops the
    run before its first step, naming the values there are."""
    _, dl = phantoms
    d = load_preset("tiny").to_dict()
    d["name"], d["train"]["source_sampling"] = "tiny-rare", "rarest_roi"
    (tmp_path / "p.json").write_text(json.dumps(d))
    ds = Trainer(dl.training, str(tmp_path / "p.json"), _cfg(tmp_path / "run"))._dataset()
    annotated = {s: {r for c in dl.training if c.source == s for r in c.annotated} for s in ds.source_names}
    w = np.array([rarest_roi_weights(annotated)[s] for s in ds.source_names])
    assert ds.source_p is not None and np.allclose(ds.source_p, w / w.sum())
    assert Trainer(dl.training, "tiny", _cfg(tmp_path / "plain"))._dataset().source_p is None
    d["train"]["source_sampling"] = "balanced"
    (tmp_path / "q.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"source sampling must be one of \('uniform', 'rarest_roi'\), got 'balanced'"):
        Trainer(dl.training, str(tmp_path / "q.json"), _cfg(tmp_path / "bad")).run()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
