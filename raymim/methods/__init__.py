"""Pretraining methods behind one interface: ``build_method(name, config)``.

Each method is a :class:`PretrainMethod` (``nn.Module``) with an ``encoder`` and a
``forward(batch) -> MethodOutput(loss, metrics, visuals)`` (metrics: detached 0-d tensors);
modules register themselves with ``@register_method(name)`` when imported here. Methods are
composed from a mask strategy (:mod:`raymim.methods.strategies`), MAE's
:meth:`MAE.reconstruct`, and the losses of :mod:`raymim.methods.losses`.

Example::

    >>> list_methods()  # ['mae', 'mim', 'simmim']
    >>> method = build_method("mim", config)
"""

from raymim.methods import hssl, mae, medim, mim, mps_ams, simmim  # noqa: F401  (registers the methods)  # noqa: F401  (lesion/report/domain-aware methods)
from raymim.methods.base import MethodOutput, PretrainMethod, build_method, list_methods, register_method
from raymim.methods.mae import MAE, Reconstruction
from raymim.methods.mim import MiM
from raymim.methods.simmim import SimMIM

__all__ = [
    "MAE",
    "MethodOutput",
    "MiM",
    "PretrainMethod",
    "Reconstruction",
    "SimMIM",
    "build_method",
    "list_methods",
    "register_method",
]
