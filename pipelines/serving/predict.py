"""Send images to an endpoint (local URL or SageMaker endpoint name) and read back the top-k classes."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipelines.util import urls

TIMEOUT_S = 60.0


class PredictError(Exception):
    """The endpoint refused the request or could not be reached; the message says which and why."""


def content_type_of(data: bytes) -> str:
    """The request content type of image bytes, from their first bytes (a file's name may lie)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return "application/x-image"


def content_type_for(path: Path) -> str:
    """The request content type of an image file, from its first bytes."""
    with path.open("rb") as handle:
        return content_type_of(handle.read(16))


def build_request(images: list[Path], top_k: int | None) -> tuple[bytes, str]:
    """One image as raw bytes; several images (or a ``top_k``) as the JSON batch of the endpoint contract.

    A request over the endpoint's payload limit is refused from the files' sizes, before any is read.
    """
    for path in images:
        if not path.is_file():
            raise PredictError(f"{path} is not a file")
    _check_payload_size(images, raw=len(images) == 1 and top_k is None)
    if len(images) == 1 and top_k is None:
        return images[0].read_bytes(), content_type_for(images[0])
    body: dict[str, Any] = {"instances": [{"b64": base64.b64encode(p.read_bytes()).decode("ascii")} for p in images]}
    if top_k is not None:
        body["top_k"] = top_k
    return json.dumps(body).encode("utf-8"), contract.JSON_CONTENT_TYPE


def _check_payload_size(images: list[Path], raw: bool) -> None:
    """The request body's size from the files' sizes (base64 adds a third in a JSON batch) against the 6 MB limit."""
    sizes = [path.stat().st_size for path in images]
    body = sizes[0] if raw else sum(4 * ((size + 2) // 3) + 12 for size in sizes) + 32
    if body > contract.MAX_PAYLOAD_BYTES:
        limit_mb = contract.MAX_PAYLOAD_BYTES / 2**20
        what = f"{images[0]} is" if len(images) == 1 else f"{len(images)} images make"
        raise PredictError(
            f"{what} a request of {body / 2**20:.1f} MB, over the endpoint's {limit_mb:.0f} MB payload limit: "
            "send a smaller image (or fewer at once)"
        )


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def invoke_url(url: str, body: bytes, content_type: str) -> Any:
    """POST to ``<url>/invocations`` (the URL may already end in /invocations)."""
    target = url.rstrip("/")
    if not target.endswith("/invocations"):
        target += "/invocations"
    try:
        urls.check_http_url(target)
    except ValueError as error:
        raise PredictError(f"--endpoint {error}") from None
    request = urllib.request.Request(  # noqa: S310 - an http(s) URL, checked above
        target, data=body, method="POST", headers={"Content-Type": content_type, "Accept": contract.JSON_CONTENT_TYPE}
    )
    try:
        with urls.urlopen(request, timeout=TIMEOUT_S) as response:  # a local endpoint: never through a proxy
            answer, media_type = response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not JSON: show the body as it came
            detail = json.loads(detail).get("error", detail)
        raise PredictError(f"the endpoint answered {error.code}: {_one_line(str(detail))}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:  # ValueError: http.client's InvalidURL
        reason = getattr(error, "reason", error)
        raise PredictError(f"cannot reach {target}: {reason}") from error
    try:
        return json.loads(answer.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        start = _one_line(answer.decode("utf-8", "replace"), 80)
        raise PredictError(
            f"{target} answered 200 with {media_type}, not the endpoint's JSON ({start!r}): is the URL this "
            "project's endpoint?"
        ) from None


def invoke_sagemaker(endpoint_name: str, body: bytes, content_type: str, region: str | None) -> Any:
    """``sagemaker-runtime`` InvokeEndpoint (needs AWS credentials; boto3 is imported only here)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = boto3.client("sagemaker-runtime", region_name=region)
        response = client.invoke_endpoint(
            EndpointName=endpoint_name, ContentType=content_type, Accept=contract.JSON_CONTENT_TYPE, Body=body
        )
        return json.loads(response["Body"].read().decode("utf-8"))
    except ClientError as error:
        raise PredictError(
            f"InvokeEndpoint {endpoint_name} failed: {error.response['Error'].get('Message')}"
        ) from error
    except BotoCoreError as error:
        raise PredictError(f"InvokeEndpoint {endpoint_name} failed: {error}") from error


def predictions_of(response: Any) -> list[list[tuple[str, float]]]:
    """(class, probability) pairs per image from the endpoint's JSON, whichever documented shape it has."""
    items = response.get("predictions", response) if isinstance(response, dict) else response
    if isinstance(items, dict):
        items = [items]
    result = []
    for item in items if isinstance(items, list) else []:
        entries = item.get("top_k", item.get("classes", item)) if isinstance(item, dict) else item
        pairs = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                name = entry.get("class", entry.get("label", entry.get("name")))
                probability = entry.get("probability", entry.get("score"))
                if name is not None and probability is not None:
                    pairs.append((str(name), float(probability)))
        result.append(pairs)
    return result


def format_predictions(images: list[Path], response: Any) -> list[str]:
    lines = []
    parsed = predictions_of(response)
    if len(parsed) != len(images) or not all(parsed):
        return [json.dumps(response, indent=2)]
    for path, pairs in zip(images, parsed, strict=True):
        lines.append(f"{path}:")
        for rank, (name, probability) in enumerate(pairs, start=1):
            lines.append(f"  {rank}. {name:<30} {probability:.4f}")
    return lines
