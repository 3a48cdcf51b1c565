"""``moto_server`` for the tests, with one S3 response corrected.

moto 5.2 serialises CompleteMultipartUpload's reply under the root tag
``CompleteMultipartUploadResponse``; S3 (and the AWS API model) uses
``CompleteMultipartUploadResult`` (getmoto/moto#10055). boto3 does not look at the root,
but pyarrow's S3 filesystem, which Ray Train uses for checkpoints on ``s3://``, treats any
other root as an error embedded in a 200 reply and fails the upload. A small WSGI
middleware renames the tag; every other byte moto returns is passed through untouched.

Run as ``python tests/s3_server.py -H 127.0.0.1 -p PORT`` (moto_server's own flags).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

WRONG, RIGHT = b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult"


def fix_complete_multipart(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """WSGI middleware: rewrite the root tag of CompleteMultipartUpload replies."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST" or "uploadId=" not in environ.get("QUERY_STRING", ""):
            return app(environ, start_response)
        held: list[Any] = []

        def hold(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            held[:] = [status, headers, exc_info]
            return lambda _data: None

        chunks = app(environ, hold)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        body = body.replace(WRONG, RIGHT)
        status, headers, exc_info = held
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers, exc_info)
        return [body]

    return wrapped


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import MotoRequestHandler
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, fix_complete_multipart(app), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
