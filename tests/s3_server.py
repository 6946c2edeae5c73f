"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, reached through the standard AWS env.

Import the fixture where it is needed: `from tests.s3_server import s3_server  # noqa: F401`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_SESSION_TOKEN": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free 127.0.0.1 port, point AWS_ENDPOINT_URL and credentials at it; yield the URL."""
    if os.environ.get("CI") == "true":  # CI installs the test extra: a missing server is an error, not a skip
        import moto.server as moto_server
        import s3fs  # noqa: F401
    else:
        moto_server = pytest.importorskip("moto.server")
        pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV | {"AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_bucket(name: str) -> str:
    """Create bucket `name` on the running server (idempotent); returns `s3://name`."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"
