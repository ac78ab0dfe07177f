"""Raw HTTP clients for the endpoint tests: the status code and body, errors included (the product's client in
pipelines/serving/predict.py turns error statuses into exceptions, which is not what these tests read)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit


def post_invocation(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    """POST ``body`` to ``<url>/invocations``; return the HTTP status and the decoded JSON answer."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def exchange(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout=60
) -> tuple[int, str, bytes]:
    """One request exactly as given (no header added but Host and Content-Length): (status, content type, body)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()
