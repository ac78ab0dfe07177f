"""The serving container image of the registered model: AWS's Ray Serve inference image, or the legacy one.

Every model artifact serves on both (see ``entrypoints/deployment.py`` and ``entrypoints/inference.py``):

- ``ray-serve`` (the default): AWS's Ray Serve inference Deep Learning Container, ``ray:serve-ml-sagemaker-cpu``
  or ``-cuda`` at a pinned tag (Python 3.13, torch 2.10, Ray 2.57). SDK v2 does not know it, so its URI is built
  here: the region's Deep Learning Containers registry account (the same map as the SDK's PyTorch images,
  ``sagemaker/image_uri_config/pytorch.json``), the region's ECR domain and the tag.
- ``pytorch-2.6``: the SageMaker PyTorch 2.6 inference image (TorchServe). Its security patches ended on
  2026-06-30; choosing it prints that.

``--serving-image-uri`` overrides either (a private mirror, a newer tag). The Ray Serve image is not made for
multi-model endpoints or serial inference pipelines (this project builds neither), is untested by AWS on
serverless endpoints, and runs only on x86 CPU and NVIDIA GPU instances: those are refused with the reason.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import Any

from pipelines import config
from steps import deploy

RAY_SERVE = "ray-serve"
LEGACY_PYTORCH = "pytorch-2.6"
SERVING_IMAGES = (RAY_SERVE, LEGACY_PYTORCH)
RAY_SERVE_TAG_MARKER = deploy.RAY_SERVE_IMAGE_MARKER  # how any Ray Serve SageMaker image URI is recognised

_FAMILY = re.compile(r"^ml\.(?P<kind>[a-z]+)(?P<generation>\d+)(?P<suffix>[a-z-]*)\.[a-z0-9]+$")


class ServingImageError(ValueError):
    """A serving image that cannot be used as asked; the message says why and what to do."""


def device_for(instance_type: str) -> str:
    """``cpu`` or ``gpu`` for a SageMaker instance type; Graviton and Inferentia/Trainium are refused."""
    match = _FAMILY.match(instance_type)
    if match is None:
        raise ServingImageError(f"{instance_type!r} is not a SageMaker instance type (ml.<family>.<size>)")
    kind, suffix = match["kind"], match["suffix"]
    if suffix.startswith("g"):
        raise ServingImageError(
            f"{instance_type} is a Graviton (Arm) instance; the Ray Serve image is built for x86 only: choose an "
            "x86 instance type (ml.m5, ml.c5, ml.g5...)"
        )
    if kind.startswith(("inf", "trn")):
        raise ServingImageError(f"{instance_type} needs a Neuron image; the serving images run on CPU or NVIDIA GPU")
    return "gpu" if kind in ("g", "p", "gr") else "cpu"


@functools.lru_cache(maxsize=1)
def dlc_registry_accounts() -> dict[str, str]:
    """Region -> Deep Learning Containers registry account, from the SDK's PyTorch inference image map.

    Each region takes the account of the newest PyTorch inference version that lists it (older versions used
    other accounts in some regions).
    """
    from packaging.version import Version
    from sagemaker import image_uris

    versions = image_uris.config_for_framework("pytorch")["inference"]["versions"]
    accounts: dict[str, str] = {}
    for version in sorted(versions, key=Version):
        accounts.update(versions[version]["registries"])
    return accounts


def ecr_domain(region: str) -> str:
    from sagemaker.utils import get_domain_for_region

    return get_domain_for_region(region)


def ray_serve_image_uri(region: str, instance_type: str) -> str:
    """``<account>.dkr.ecr.<region>.<domain>/ray:serve-ml-sagemaker-{cpu|cuda}-v<version>``."""
    accounts = dlc_registry_accounts()
    if region not in accounts:
        raise ServingImageError(
            f"region {region!r} has no Deep Learning Containers registry in the SDK's map; pass --serving-image-uri"
        )
    flavour = "cuda" if device_for(instance_type) == "gpu" else "cpu"
    tag = config.RAY_SERVE_IMAGE_TAG.format(device=flavour)
    return f"{accounts[region]}.dkr.ecr.{region}.{ecr_domain(region)}/{config.RAY_SERVE_IMAGE_REPOSITORY}:{tag}"


def legacy_pytorch_image_uri(region: str, instance_type: str) -> str:
    """The SageMaker PyTorch inference image of ``config.INFERENCE_FRAMEWORK_VERSION`` (past end of patches)."""
    from sagemaker import image_uris

    device_for(instance_type)
    return image_uris.retrieve(
        framework="pytorch",
        region=region,
        version=config.INFERENCE_FRAMEWORK_VERSION,
        py_version=config.PYTHON_VERSION,
        instance_type=instance_type,
        image_scope="inference",
    )


def serving_image_uri(
    region: str, instance_type: str, image: str = config.SERVING_IMAGE, override: str | None = None
) -> str:
    """The serving image URI: ``override`` if given, else ``image`` built for the region and device."""
    if image not in SERVING_IMAGES:
        raise ServingImageError(f"serving image {image!r} is not one of {', '.join(SERVING_IMAGES)}")
    if override:
        return override
    if image == RAY_SERVE:
        return ray_serve_image_uri(region, instance_type)
    return legacy_pytorch_image_uri(region, instance_type)


def framework_version(image: str) -> str:
    """The torch version the serving image runs (the model package's FrameworkVersion)."""
    return config.RAY_SERVE_TORCH_VERSION if image == RAY_SERVE else config.INFERENCE_FRAMEWORK_VERSION


def legacy_image_warning() -> str:
    return (
        f"warning: the SageMaker PyTorch {config.INFERENCE_FRAMEWORK_VERSION} inference image is past end of "
        f"patches (since {config.LEGACY_INFERENCE_END_OF_PATCHES}): endpoints on it get no security fixes. The "
        f"default, {RAY_SERVE}, is AWS's supported successor and serves the same artifact."
    )


def check_supported(image: str, *, serverless: bool = False, endpoint_instance_type: str | None = None) -> None:
    """Refuse what the chosen image cannot serve (with the reason); warn about the legacy image."""
    if image == RAY_SERVE and serverless:
        raise ServingImageError(
            "a serverless endpoint cannot use the Ray Serve image: AWS has not tested it there, and Ray's ~1.3 GB "
            "and ~20 s cold start leave little of serverless memory and start time. Serve from instances "
            f"(--endpoint-instance-type), or choose --serving-image {LEGACY_PYTORCH} knowingly (no security patches)"
        )
    if endpoint_instance_type is not None:
        device_for(endpoint_instance_type)
    if image == LEGACY_PYTORCH:
        print(legacy_image_warning(), file=sys.stderr)


# --- command-line flags (definition, upsert) -----------------------------------------------------------------------


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serving-image",
        choices=SERVING_IMAGES,
        default=config.SERVING_IMAGE,
        help=f"container the registered model serves in (default: %(default)s; {LEGACY_PYTORCH} is past end of "
        "patches)",
    )
    parser.add_argument(
        "--serving-image-uri", default=None, help="use this image URI for serving instead (default: built)"
    )
    parser.add_argument(
        "--serving-instance-type",
        default=config.SERVING_INSTANCE_TYPE,
        help="instance type the image is chosen for: CPU or GPU build (default: %(default)s)",
    )


def serving_options(args: argparse.Namespace) -> dict[str, Any]:
    """The PipelineOptions fields of the serving flags, checked against the endpoint flags when present."""
    image = getattr(args, "serving_image", config.SERVING_IMAGE)
    instance_type = getattr(args, "serving_instance_type", config.SERVING_INSTANCE_TYPE)
    serverless = getattr(args, "serverless_memory_mb", None) is not None
    endpoint_instance_type = None if serverless else getattr(args, "endpoint_instance_type", None)
    check_supported(image, serverless=serverless, endpoint_instance_type=endpoint_instance_type)
    device_for(instance_type)
    if endpoint_instance_type and device_for(endpoint_instance_type) != device_for(instance_type):
        raise ServingImageError(
            f"--endpoint-instance-type {endpoint_instance_type} is a {device_for(endpoint_instance_type).upper()} "
            f"instance but the model is registered with the {device_for(instance_type).upper()} image "
            f"(--serving-instance-type {instance_type}): make them agree"
        )
    return {
        "serving_image": image,
        "serving_image_uri": getattr(args, "serving_image_uri", None),
        "serving_instance_type": instance_type,
    }
