"""A raw HTTP client for the endpoint tests: the status code and JSON body, errors included (the product's
client in pipelines/local/predict.py turns error statuses into exceptions, which is not what these tests read)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post_invocation(url: str, body: bytes, content_type: str, timeout: float = 30) -> tuple[int, dict]:
    """POST ``body`` to ``<url>/invocations``; return the HTTP status and the decoded JSON answer."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
