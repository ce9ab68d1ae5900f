"""The interface every pretraining method implements, and the method registry.

A method is an ``nn.Module`` holding ``encoder`` (the backbone downstream fine-tuning loads)
whose ``forward(batch)`` returns a :class:`MethodOutput`. Methods register by name, each with
the dataclass of the ``method`` config fields it reads (timm's ``@register_model`` pattern)::

    @dataclass
    class MAEConfig(MaskedReconstructionConfig):
        mask_block: int = 1

    @register_method("mae", config=MAEConfig)
    class MAE(PretrainMethod): ...

    method = build_method("mae", config)      # config: RaymimConfig
    out = method({"image": torch.rand(2, 1, 32, 32, 32)})
    out.loss.backward(); float(out.metrics["loss_rec"]); out.visuals["recon"]

Metrics are detached 0-d tensors, not floats: converting a loss to a Python number waits for the
accelerator to finish the step (a host synchronisation). The training loop accumulates them on
the device and converts them once per ``train.log_every`` steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from raymim.config import MethodConfig, RaymimConfig, check_positive


class MethodOutput(NamedTuple):
    """``loss``: scalar tensor; ``metrics``: detached 0-d tensors (each loss term, mask ratio, ...;
    on the batch's device, or on the host for values the host already knows, see :func:`host_scalar`);
    ``visuals``: detached tensors ``[C, D, H, W]`` (on the batch's device) for reconstruction panels."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    visuals: dict[str, torch.Tensor]


def host_scalar(value: float) -> torch.Tensor:
    """A metric the host already knows (a scheduled ratio, a count from the batch's columns) as a
    0-d float32 tensor on the host: no copy to the device, and no read-back either."""
    return torch.tensor(float(value), dtype=torch.float32)


class PretrainMethod(nn.Module):
    """Base class: holds the config, the ``encoder`` and the training-progress hook."""

    encoder: nn.Module

    def __init__(self, config: RaymimConfig) -> None:
        super().__init__()
        self.config = config
        self.progress = 0.0  # fraction of training done, set by set_progress

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the trainer every step; schedules (e.g. an adaptive mask ratio) read it."""
        self.progress = float(step) / float(max(total_steps, 1))

    def fit_input(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C, D, H, W] -> float, resized (trilinear) to the model's ``img_size`` if needed."""
        image = image.float()
        size = (self.config.model.img_size,) * 3
        if tuple(image.shape[2:]) != size:
            image = F.interpolate(image, size=size, mode="trilinear", align_corners=False)
        return image

    @staticmethod
    def panel(x: torch.Tensor) -> torch.Tensor:
        """First sample of a [B, C, D, H, W] batch, detached, float: [C, D, H, W].

        Left on the batch's device: a copy to the host every step would synchronise the GPU
        (measured in bench/bench_gpu.py); the panel renderer copies the one slice it draws.
        """
        return x[0].detach().float()

    @staticmethod
    def probe_generator(seed: int) -> torch.Generator:
        """A CPU generator for the probe's fixed mask / views (the same for every trial)."""
        return torch.Generator().manual_seed(int(seed))

    def probe_loss(self, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor | None:
        """A score of the current weights on held-out ``images`` [N, C, D, H, W] that does not
        depend on this method's own hyperparameters (mask ratio, schedule, selection, loss
        weights, temperature), so trials of a sweep can be compared on it: the reconstruction
        methods return the pixel-space MSE on the tokens of a fixed random mask at ``ratio``
        drawn from ``seed``. ``None``: this method has no such probe."""
        return None

    def forward(self, batch: dict[str, Any]) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ProjectionConfig(MethodConfig):
    """Config part of the methods with a contrastive or alignment loss on projected features:
    the InfoNCE / NT-Xent temperature and the projection heads' output width."""

    tau: float = 0.2
    proj_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("method.tau", self.tau)
        check_positive("method.proj_dim", self.proj_dim)


M = TypeVar("M", bound=type[PretrainMethod])
_METHODS: dict[str, type[PretrainMethod]] = {}
_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_method(name: str, *, config: type[MethodConfig]) -> Callable[[M], M]:
    """Class decorator adding a :class:`PretrainMethod` to the registry under ``name``, with
    ``config``, the :class:`~raymim.config.MethodConfig` dataclass of the fields it reads (its
    ``method`` config section; one class per method)."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig) and dataclasses.is_dataclass(config)):
        raise TypeError(f"register_method({name!r}) needs config= a MethodConfig dataclass, got {config!r}.")
    owner = vars(config).get("method_name")
    if owner not in (None, name):
        raise ValueError(f"{config.__name__} is already the config of method {owner!r}; method {name!r} needs its own.")

    def wrap(cls: M) -> M:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__name__}.")
        _METHODS[name] = cls
        _CONFIGS[name] = config
        config.method_name = name
        cls.method_name = name
        cls.config_class = config
        return cls

    return wrap


def registered_configs() -> dict[str, type[MethodConfig]]:
    """``{method name: its config class}`` of every registered method."""
    return dict(_CONFIGS)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def build_method(name: str, config: RaymimConfig) -> PretrainMethod:
    """Instantiate the method registered as ``name`` from the whole config, whose ``method``
    section must be that method's config class (``raymim.config.method_config(name, ...)``)."""
    if name not in _METHODS:
        raise ValueError(f"method.name should be one of {tuple(list_methods())}, got {name!r}.")
    if not isinstance(config.method, _CONFIGS[name]):
        raise ValueError(f"method {name!r} needs a {_CONFIGS[name].__name__} method section, got "
                         f"{type(config.method).__name__} (method.name={config.method.name!r}).")
    return _METHODS[name](config)
