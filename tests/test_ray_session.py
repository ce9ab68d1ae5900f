"""``ensure_ray``: what it passes to ``ray.init``, and that it leaves a running session alone."""

from __future__ import annotations

import pytest

from raymim.ray_session import ensure_ray, pretrain_log_settings, ray_init_kwargs


def test_init_kwargs_honour_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_init_kwargs(log_to_driver=False) == {"address": "10.0.0.5:6379", "log_to_driver": False}
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_init_kwargs(logging_level="debug") == {"address": None, "log_to_driver": True,
                                                      "logging_level": "DEBUG"}


@pytest.mark.parametrize("env, want", [
    ({}, {"log_to_driver": True, "logging_level": "INFO"}),
    ({"RAYMIM_QUIET": "1"}, {"log_to_driver": False, "logging_level": "WARNING"}),
    ({"RAYMIM_QUIET": "1", "RAYMIM_LOG_LEVEL": "error"}, {"log_to_driver": False, "logging_level": "ERROR"}),
    ({"RAYMIM_LOG_LEVEL": "debug"}, {"log_to_driver": True, "logging_level": "DEBUG"}),
])
def test_pretrain_log_settings(monkeypatch, env, want):
    for key in ("RAYMIM_QUIET", "RAYMIM_LOG_LEVEL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert pretrain_log_settings() == want


@pytest.mark.ray
def test_running_session_is_left_alone(ray_session, monkeypatch):
    # A second ray.init would raise ("called ray.init twice") or join this unreachable address.
    gcs = ray_session.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", "203.0.113.1:6379")
    assert ensure_ray(log_to_driver=True, logging_level="DEBUG") is False
    assert ray_session.is_initialized() and ray_session.get_runtime_context().gcs_address == gcs
