"""``bench/pool_heldout.py``: per-ROI Dice pooled over several held-out phantom sets."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("pool_heldout", Path(__file__).parents[2] / "bench" / "pool_heldout.py")
pool_heldout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool_heldout)


def _results(path: Path, rois: dict) -> None:
    path.write_text(json.dumps({"results": {"partial": {**rois, "_mean": [0.0]}}}))


def test_each_roi_is_the_mean_over_every_phantom_that_contains_it(tmp_path, capsys):
    """3 own phantoms + 2 rescored: an ROI missing from a phantom (NaN) does not count against it,
    and a faint phantom of the own set weighs 1 in 5, not 1 in 3."""
    _results(tmp_path / "results.json", {"liver": [0.9, 0.9, 0.9], "hepatic_vessel": [0.5, 0.8, 0.8]})
    _results(tmp_path / "results-rescored-fresh.json", {"liver": [0.8, float("nan")], "hepatic_vessel": [0.8, 0.8]})
    files = pool_heldout.result_files(tmp_path, ["fresh"])
    means, n = pool_heldout.pooled_dice(files)
    assert n == 5
    assert math.isclose(means["liver"], 0.875) and math.isclose(means["hepatic_vessel"], 0.74)
    assert "_mean" not in means
    assert pool_heldout.main([str(tmp_path), "--sets", "fresh"]) == 0
    out = capsys.readouterr().out
    assert "5 phantoms" in out and "ROIs >= 0.70: 2/2" in out and "hepatic_vessel 0.740" in out


def test_a_tagged_rescoring_reads_its_own_files_and_a_missing_one_is_named(tmp_path, capsys):
    assert pool_heldout.result_files(tmp_path, ["fresh"], "rthv03-") == [
        tmp_path / "results-rescored-rthv03.json", tmp_path / "results-rescored-rthv03-fresh.json"]
    _results(tmp_path / "results.json", {"liver": [0.9]})
    assert pool_heldout.main([str(tmp_path), "--sets", "fresh"]) == 2
    assert "results-rescored-fresh.json not found" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": {"partial": {"_mean": [0.0]}}}))
    with pytest.raises(ValueError, match="no per-ROI results"):
        pool_heldout.pooled_dice([empty])
