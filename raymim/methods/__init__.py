"""Pretraining methods behind one interface: ``build_method(name, config)``.

Each method is a :class:`PretrainMethod` (``nn.Module``) with an ``encoder`` and a
``forward(batch) -> MethodOutput(loss, metrics, visuals)`` (metrics: detached 0-d tensors);
modules register themselves with ``@register_method(name, config=TheirConfig)`` when imported
here, each with the dataclass of its own ``method`` config fields (a
:class:`raymim.config.MethodConfig` subclass declared beside it). Methods are composed from a
mask strategy (:mod:`raymim.methods.strategies`), MAE's :meth:`MAE.reconstruct`, and the losses
of :mod:`raymim.methods.losses`.

Example::

    >>> list_methods()  # ['hssl', 'mae', 'medim', 'mim', 'mps_ams', 'simclr', 'simmim']
    >>> cfg = RaymimConfig(method=method_config("mim", levels=2, level_sizes=[32, 16]))
    >>> method = build_method("mim", cfg)
"""

from raymim.methods import hssl, mae, medim, mim, mps_ams, simmim  # noqa: F401  (registers the methods)
from raymim.methods.base import (
    MethodOutput,
    PretrainMethod,
    ProjectionConfig,
    build_method,
    list_methods,
    register_method,
    registered_configs,
)
from raymim.methods.hssl import HSSLConfig, SimCLRConfig
from raymim.methods.mae import MAE, MAEConfig, MaskedReconstructionConfig, Reconstruction
from raymim.methods.medim import MedIMConfig
from raymim.methods.mim import MiM, MiMConfig, MultiLevelConfig
from raymim.methods.mps_ams import MPSAMSConfig
from raymim.methods.simmim import SimMIM, SimMIMConfig

__all__ = [
    "MAE",
    "HSSLConfig",
    "MAEConfig",
    "MPSAMSConfig",
    "MaskedReconstructionConfig",
    "MedIMConfig",
    "MethodOutput",
    "MiM",
    "MiMConfig",
    "MultiLevelConfig",
    "PretrainMethod",
    "ProjectionConfig",
    "Reconstruction",
    "SimCLRConfig",
    "SimMIM",
    "SimMIMConfig",
    "build_method",
    "list_methods",
    "register_method",
    "registered_configs",
]
