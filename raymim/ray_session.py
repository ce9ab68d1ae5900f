"""One way into Ray for every command: join the running session, ``$RAY_ADDRESS``, or a local one.

``raymim prepare``, ``pretrain``, ``finetune`` and ``tune`` all call :func:`ensure_ray` before their
first Ray API call. It does nothing when Ray is already initialised (a test's shared session, a
Tune trial, a driver that called ``ray.init`` itself), so the first caller's settings win. Otherwise
it calls ``ray.init`` with ``address=$RAY_ADDRESS`` (the cluster a ``ray job submit`` driver runs
on; unset: a new local instance) and the caller's logging settings:

- ``prepare`` passes ``log_to_driver=False`` (per-case worker output would flood the console);
- ``pretrain`` passes what ``--quiet`` / ``--log-level`` set in ``$RAYMIM_QUIET`` /
  ``$RAYMIM_LOG_LEVEL`` (:func:`pretrain_log_settings`);
- ``finetune`` and ``tune`` keep Ray's defaults.

Example::

    started = ensure_ray(log_to_driver=False)  # True only when this call ran ray.init
"""

from __future__ import annotations

import os
from typing import Any


def ray_init_kwargs(*, log_to_driver: bool = True, logging_level: str | int | None = None) -> dict[str, Any]:
    """The keyword arguments :func:`ensure_ray` passes to ``ray.init`` (``$RAY_ADDRESS`` read now)."""
    kwargs: dict[str, Any] = {"address": os.environ.get("RAY_ADDRESS") or None, "log_to_driver": log_to_driver}
    if logging_level is not None:
        kwargs["logging_level"] = logging_level.upper() if isinstance(logging_level, str) else logging_level
    return kwargs


def pretrain_log_settings() -> dict[str, Any]:
    """``log_to_driver`` / ``logging_level`` for ``raymim pretrain``: ``--quiet`` (``$RAYMIM_QUIET=1``)
    hides worker output and logs warnings only; ``--log-level`` (``$RAYMIM_LOG_LEVEL``) overrides the level."""
    quiet = os.environ.get("RAYMIM_QUIET") == "1"
    return {"log_to_driver": not quiet,
            "logging_level": os.environ.get("RAYMIM_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()}


def ray_available() -> bool:
    """Whether Ray can be imported here (``raymim pretrain`` and ``raymim evidence`` run without it,
    in one process; the other commands need it)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def ensure_ray(*, log_to_driver: bool = True, logging_level: str | int | None = None) -> bool:
    """Initialise Ray unless it already is; returns whether this call started (or joined) a session."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(**ray_init_kwargs(log_to_driver=log_to_driver, logging_level=logging_level))
    return True
