"""The contract every registered method passes (later methods add a case to ``CASES``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from raymim.config import method_config
from raymim.methods import MAEConfig, MethodOutput, PretrainMethod, build_method, list_methods, register_method
from raymim.methods.base import registered_configs
from raymim.train.schedule import autocast

from .conftest import CASES, tiny_config

# Metric that must fall 10x when overfitting one volume. MiM's total also holds alpha * L_C, an
# InfoNCE over parent tokens whose floor (neighbouring tokens of the same cube are near-duplicates)
# is far from 0, so the order-of-magnitude check applies to its reconstruction term L_R.
OVERFIT_METRIC = {"mim": "loss_rec", "mps_ams": "loss_rec"}
# MedIM adds an alignment term, HSSL / SimCLR contrastive (and domain) terms with floors > 0.
OVERFIT_METRIC.update(medim="loss_rec", hssl="loss_rec")
# SimMIM's paper loss is L1; an order of magnitude in L1 is two in MSE, so the overfit check
# compares every method on the same (MSE) scale.
OVERFIT_OVERRIDES: dict[str, dict] = {"simmim": {"recon_loss": "mse"}}
# HSSL has no reconstruction term by default (and a one-volume batch no negatives): the overfit check
# runs its optional masked-reconstruction term. Plain SimCLR has none at all: it is left out of the
# overfit check, and tests/methods/test_hssl.py checks that its NT-Xent falls on a batch of phantoms.
OVERFIT_OVERRIDES["hssl"] = {"rec_weight": 1.0}
NO_OVERFIT = {"simclr"}


def test_every_registered_method_has_a_case():
    assert {"mae", "simmim", "mim"} <= set(list_methods())
    assert set(list_methods()) <= {name for name, _ in CASES}


def test_every_method_owns_its_config_class():
    """One registered config class per method, whose defaults validate; build_method refuses
    another method's section; a config class cannot serve two methods."""
    configs = registered_configs()
    assert set(configs) == set(list_methods()) and len(set(configs.values())) == len(configs)
    for name, cls in configs.items():
        assert cls().name == name and method_config(name) == cls()
    with pytest.raises(ValueError, match="method 'mim' needs a MiMConfig method section, got MAEConfig"):
        build_method("mim", tiny_config("mae"))
    with pytest.raises(ValueError, match="MAEConfig is already the config of method 'mae'"):
        register_method("mae2", config=MAEConfig)
    assert "mae2" not in list_methods()


@pytest.mark.parametrize("name,backbone", CASES)
def test_contract(name: str, backbone: str, volume: torch.Tensor):
    batch = {"image": volume.repeat(2, 1, 1, 1, 1)}
    torch.manual_seed(0)
    method = build_method(name, tiny_config(name, backbone))
    assert isinstance(method, PretrainMethod) and isinstance(method.encoder, torch.nn.Module)
    method.set_progress(3, 10)
    out = method(batch)
    assert isinstance(out, MethodOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # Metrics stay tensors (detached, 0-d): the training loop converts them once per log_every.
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
    assert all(math.isfinite(float(v)) for v in out.metrics.values())
    assert {"loss", "mask_ratio"} <= set(out.metrics)
    # Reconstruction panels, or (contrastive methods without a reconstruction term) the two views.
    assert {"input", "masked", "recon"} <= set(out.visuals) or {"input", "view1", "view2"} <= set(out.visuals)
    assert all(v.shape == (1, 32, 32, 32) and not v.requires_grad for v in out.visuals.values())
    out.loss.backward()
    grads = [p.grad for p in method.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the encoder"
    # Deterministic under a seed: same weights, same masks, same loss.
    torch.manual_seed(1)
    first = method(batch).loss.item()
    torch.manual_seed(1)
    assert method(batch).loss.item() == first


@pytest.mark.parametrize(
    "name,backbone",
    [pytest.param(*c, marks=pytest.mark.slow) if c[1] == "swin" else c for c in CASES if c[0] not in NO_OVERFIT],
)
def test_overfits_one_phantom(name: str, backbone: str, volume: torch.Tensor):
    torch.manual_seed(0)
    method = build_method(name, tiny_config(name, backbone, **OVERFIT_OVERRIDES.get(name, {})))
    steps = 200
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # settles L1 losses
    key = OVERFIT_METRIC.get(name, "loss")
    history: list[float] = []
    totals: list[float] = []
    for _ in range(steps):
        out = method({"image": volume})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
        history.append(out.metrics[key])
        totals.append(out.loss.item())
    start, end = sum(history[:5]) / 5, sum(history[-10:]) / 10
    assert end < start / 10, f"{key}: {start:.4f} -> {end:.4f}"
    assert sum(totals[-10:]) < sum(totals[:5]) * 2  # the total loss falls too


@pytest.mark.parametrize("name,backbone", [c for c in CASES if c[1] != "swin"])
def test_bf16_autocast(name: str, backbone: str, volume: torch.Tensor):
    """Every method runs under the training loop's bf16 autocast (the GPU default), report path included."""
    batch = {"image": volume.repeat(2, 1, 1, 1, 1), "domain": ["site0", "site1"],
             "report": ["A 12 mm hypodense lesion in the right liver.", "A 7 mm nodule in the left lung."],
             "lesion_prob": torch.rand(2, 64)}
    torch.manual_seed(0)
    method = build_method(name, tiny_config(name, backbone))
    with autocast("bf16", torch.device("cpu")):
        out = method(batch)
    assert torch.isfinite(out.loss)
    assert all(math.isfinite(float(v)) for v in out.metrics.values())
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())


# ---- no host synchronisation in a training step ----------------------------------------------------
#
# On a GPU, reading a value of a device tensor on the host (``.item()``, ``float(t)``, ``if t:``,
# ``.tolist()``, ``.numpy()``, ``.cpu()``, and data-dependent shapes such as ``nonzero`` or boolean
# indexing) waits for every queued kernel: a host synchronisation. On the CPU these are free, so the
# test runs the step on the ``meta`` device, which stands in for the accelerator: meta tensors have
# shapes but no values, so any of those reads fails, while host-side bookkeeping on real CPU tensors
# (random box positions, tokenizer output) works as it does next to a GPU. The reads named above
# are also patched to raise a clear error for non-CPU tensors.

SYNC_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class HostSync(AssertionError):
    pass


@contextmanager
def host_reads_of_device_tensors_raise() -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_READS}

    def guarded(name: str, fn):
        def read(self, *args, **kwargs):
            if self.device.type != "cpu":
                raise HostSync(f"Tensor.{name}() of a {self.device.type} tensor: a host synchronisation")
            return fn(self, *args, **kwargs)

        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, guarded(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def test_the_sync_guard_catches_host_reads():
    x = torch.ones(3, device="meta")
    with host_reads_of_device_tensors_raise():
        for read in (lambda: float(x.sum()), lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.tolist(),
                     lambda: x.cpu(), lambda: x[x > 0], lambda: x.nonzero()):
            with pytest.raises((HostSync, RuntimeError, NotImplementedError)):
                read()
        assert float(torch.ones(()).sum()) == 1.0  # host tensors are untouched


SYNC_CASES = CASES + [
    ("mps_ams", "vit", {"levels": 1}),  # online MPS (k-means) on the MAE path
    ("mps_ams", "vit", {"levels": 1, "mps_mode": "prior"}),
    ("mps_ams", "vit", {"mps_mode": "prior", "level_sizes": [32, 16]}),  # prior on MiM levels
    ("medim", "vit", {"medim_mode": "sdm"}),
]


@pytest.mark.parametrize("case", SYNC_CASES, ids=lambda c: "-".join(str(v) for v in c[:2]) + ("+" if c[2:] else ""))
def test_step_reads_nothing_back_from_the_accelerator(case: tuple, volume: torch.Tensor):
    """Forward + backward of every registered method on the stand-in accelerator, with a batch as
    the training loop hands it over (every tensor column moved to the device, text as lists)."""
    name, backbone, *extra = case
    torch.manual_seed(0)
    method = build_method(name, tiny_config(name, backbone, **(extra[0] if extra else {}))).to("meta")
    method.set_progress(3, 10)
    batch = {"image": volume.repeat(2, 1, 1, 1, 1).to("meta"), "domain": ["site0", "site1"],
             "report": ["A 12 mm hypodense lesion in the right liver.", "A 7 mm nodule in the left lung."],
             "lesion_prob": torch.rand(2, 64).to("meta"), "case_id": ["a", "b"]}
    with host_reads_of_device_tensors_raise():
        out = method(batch)
        out.loss.backward()
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in out.metrics.values())
