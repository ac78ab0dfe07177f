"""What the serving tests share: a tiny model artifact, test images, and the hostile requests every host must refuse
with a 4xx and ``{"error", "code"}`` (and then go on serving)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from entrypoints import contract, modeling
from pipelines.util import fsutil

CLASSES = ["cat", "dog", "fox", "owl", "elk", "yak", "emu"]


def model_config() -> modeling.ModelConfig:
    return modeling.ModelConfig("resnet18", len(CLASSES), CLASSES, input_size=32, resize_size=36)


def make_artifact(folder: Path, seed: int = 0) -> Path:
    """``folder/model`` (the extracted artifact, as train.py writes it) and ``folder/model.tar.gz``."""
    torch.manual_seed(seed)
    model_dir = modeling.save_artifact(modeling.build_model(model_config()), folder / "model", model_config())
    fsutil.make_tarball(model_dir, folder / "model.tar.gz")
    return model_dir


def package_for(tarball: Path, version: int = 1, group: str = "Serving") -> dict:
    """A registry entry (what the local registry holds) pointing at ``tarball``."""
    return {
        "ModelPackageArn": f"arn:aws:sagemaker:us-east-1:000000000000:model-package/{group.lower()}/{version}",
        "ModelPackageGroupName": group,
        "ModelPackageVersion": version,
        "ModelApprovalStatus": "Approved",
        "InferenceSpecification": {"Containers": [{"ModelDataUrl": tarball.resolve().as_uri(), "Environment": {}}]},
    }


def image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(body: bytes) -> str:
    return base64.b64encode(body).decode()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims ``width`` x ``height`` (the pixel data is for 1x1): no memory needed."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


JPEG = encode(image(64, 48, seed=5), "JPEG", quality=90)
PNG = encode(image(64, 48, seed=6), "PNG")
WEBP = encode(image(50, 50, seed=7), "WEBP")

# One image per request content type: (body, Content-Type).
VALID_REQUESTS = {
    "image/jpeg": (JPEG, "image/jpeg"),
    "image/png": (PNG, "image/png"),
    "application/x-image": (WEBP, "application/x-image"),
    "application/json": (
        json.dumps({"instances": [{"b64": b64(JPEG)}, {"b64": b64(PNG)}], "top_k": 3}).encode(),
        "application/json",
    ),
}

_JSON = "application/json"
# name -> (body, headers, expected status, expected code). The app's refusals of bad input, then its own.
HOSTILE_REQUESTS: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "unsupported content type": (b"a,b\n1,2\n", {"Content-Type": "text/csv"}, 415, "unsupported_content_type"),
    "unsupported image type": (JPEG, {"Content-Type": "image/gif"}, 415, "unsupported_content_type"),
    "unsupported accept": (JPEG, {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406, "unsupported_accept"),
    "empty body": (b"", {"Content-Type": "image/jpeg"}, 400, "empty_body"),
    "not an image": (b"plain text, not a picture", {"Content-Type": "image/jpeg"}, 400, "not_an_image"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], {"Content-Type": "image/jpeg"}, 400, "truncated_image"),
    "over the pixel limit": (huge_png_header(8000, 6000), {"Content-Type": "image/png"}, 413, "image_too_large"),
    "far over the pixel limit": (huge_png_header(30000, 20000), {"Content-Type": "image/png"}, 413, "image_too_large"),
    "json that is not json": (b"{not json", {"Content-Type": _JSON}, 400, "invalid_json"),
    "json that is not utf-8": (b'{"instances": "\xff\xfe"}', {"Content-Type": _JSON}, 400, "invalid_json"),
    "json in latin-1 with its charset": (
        '{"instances": "é"}'.encode("latin-1"),
        {"Content-Type": "application/json; charset=latin-1"},
        400,
        "invalid_json",
    ),
    "deeply nested json array": (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": _JSON}, 400, "invalid_json"),
    "deeply nested json object": (
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        {"Content-Type": _JSON},
        400,
        "invalid_json",
    ),
    "json number too long to convert": (
        b'{"instances": [], "top_k": ' + b"7" * 5000 + b"}",
        {"Content-Type": _JSON},
        400,
        "invalid_json",
    ),
    "json bad base64": (b'{"instances": [{"b64": "***"}]}', {"Content-Type": _JSON}, 400, "invalid_base64"),
    "json top_k not a number": (
        json.dumps({"instances": [{"b64": b64(JPEG)}], "top_k": "3"}).encode(),
        {"Content-Type": _JSON},
        400,
        "invalid_request",
    ),
    "batch over the limit": (
        json.dumps({"instances": [{"b64": "x"}] * (contract.MAX_BATCH_IMAGES + 1)}).encode(),
        {"Content-Type": _JSON},
        413,
        "batch_too_large",
    ),
    "no content type: taken as JSON, as the adapter does": (JPEG, {}, 400, "invalid_json"),
    "body over SageMaker's payload limit": (
        b"\x00" * (contract.MAX_PAYLOAD_BYTES + 1),
        {"Content-Type": "image/png"},
        413,
        "payload_too_large",
    ),
}
