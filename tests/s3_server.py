"""A local S3 endpoint for tests: moto's S3 server in a thread of the test process.

:func:`start` returns the server and the environment that points every S3 client at it:
``AWS_ENDPOINT_URL`` (honoured by pyarrow >= 15, and so by :mod:`ood_core.storage` and Ray Tune's
storage, and by boto3), dummy credentials and a region. Set it with ``monkeypatch`` in the test
process, or pass it to a subprocess (a sweep, a simulated Ray cluster): no code path of the project
knows it is talking to moto.

moto 5.2.1 answers CompleteMultipartUpload with a ``<CompleteMultipartUploadResponse>`` root element
instead of S3's ``<CompleteMultipartUploadResult>``; pyarrow (>= 15) reads any other root as an
error embedded in a 200 response and fails every multipart upload (getmoto/moto#10055, a regression
fixed in later moto releases). :class:`_FixMultipartRoot` renames the element in that response only;
on a fixed moto it changes nothing.
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

BUCKET = "ood-sweep-test"


class _FixMultipartRoot:
    """WSGI middleware: the CompleteMultipartUpload response with S3's root element name."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
            return self.app(environ, start_response)
        seen = {}

        def capture(status, headers, exc_info=None):
            seen.update(status=status, headers=headers)
            return lambda data: None

        chunks = self.app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in seen["headers"]]
        start_response(seen["status"], headers)
        return [body]


class S3Server:
    """moto's S3 backend behind a threaded werkzeug server on 127.0.0.1 (a free port)."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs):
                pass

        app = _FixMultipartRoot(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def env(self) -> Dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str = BUCKET) -> str:
        import boto3

        env = self.env()
        boto3.client("s3", endpoint_url=self.endpoint, region_name=env["AWS_DEFAULT_REGION"],
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


def start(bucket: str = BUCKET) -> Tuple[S3Server, str]:
    """Start a server with one bucket; return ``(server, "s3://<bucket>")``."""
    server = S3Server()
    return server, server.create_bucket(bucket)
