"""What the driver's environment hands to Ray workers."""

from __future__ import annotations

from cluster.ray_env import forwarded_env


def test_s3_endpoint_and_region_reach_the_workers_but_credentials_do_not(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "WANDB_MODE" not in env
