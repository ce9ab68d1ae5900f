"""Phantoms with labels and tiny pretrained-encoder checkpoints for the downstream tests."""

from __future__ import annotations

import pytest
import torch
from downstream_fixtures import TINY_VIT
from monai.networks.nets import ViT

from raymim.config import config_from_dict
from raymim.train.checkpoint import write_checkpoint


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    from raymim.data.synth import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), cases=6, size=32, seed=0)


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    enc = ViT(1, 32, 16, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
    cfg = config_from_dict({"model": TINY_VIT, "method": {"name": "mim"}})
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "encoder", state={}, encoder_state=enc.state_dict(),
                            cfg=cfg, meta={})


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
