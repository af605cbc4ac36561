import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight ``tiny`` model with 3 tasks, saved as a real checkpoint (plumbing only)."""
    from cdpdnet.checkpoint import save_checkpoint
    from cdpdnet.factory import build_model, checkpoint_payload
    from cdpdnet.preset import load_preset

    torch.manual_seed(0)
    preset = load_preset("tiny")
    model = build_model(preset, num_tasks=3)
    model.net.set_text_embeddings(torch.randn(32, preset.network.text_dim), torch.randn(3, preset.network.text_dim))
    tasks = [{"name": n, "rois": r} for n, r in (("a", [1, 2, 3]), ("b", [6, 27]), ("c", [16, 17]))]
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, checkpoint_payload(model, preset, tasks, {"encoder": "random"}, model_version="test-1"))
    return path
