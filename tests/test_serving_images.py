"""The serving image of the registered model (pipelines/images.py): AWS's Ray Serve image by default, built for
every region of the SDK's PyTorch image map and both devices; the legacy PyTorch 2.6 image on request, with its
end-of-patches warning; what neither can serve is refused with the reason."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version
from sagemaker import image_uris
from sagemaker.utils import get_domain_for_region

from pipelines import config, images
from pipelines.aws import iam

ROOT = Path(__file__).resolve().parents[1]
ACCOUNT_ID = "123456789012"


def _pytorch_regions() -> dict[str, str]:
    """Every region of the SDK's PyTorch map (all scopes, all versions) -> the newest inference registry for it."""
    framework = image_uris.config_for_framework("pytorch")
    regions: set[str] = set()
    for scope in framework.values():
        if isinstance(scope, dict) and "versions" in scope:
            for spec in scope["versions"].values():
                regions.update(spec.get("registries", {}))
    newest: dict[str, str] = {}
    versions = framework["inference"]["versions"]
    for version in sorted(versions, key=Version):
        newest.update(versions[version]["registries"])
    return {region: newest.get(region, "") for region in sorted(regions)}


REGIONS = _pytorch_regions()


def test_the_map_is_the_sdks_whole_pytorch_map() -> None:
    assert len(REGIONS) >= 35 and {"us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1", "ap-east-1"} <= set(REGIONS)
    assert all(REGIONS.values()), [region for region, account in REGIONS.items() if not account]


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("region", list(REGIONS))
def test_the_ray_serve_uri_covers_every_region_for_both_devices(region: str, device: str) -> None:
    instance_type = "ml.m5.xlarge" if device == "cpu" else "ml.g5.xlarge"
    uri = images.serving_image_uri(region, instance_type)
    flavour = "cpu" if device == "cpu" else "cuda"
    domain = re.escape(get_domain_for_region(region))
    expected = rf"{REGIONS[region]}\.dkr\.ecr\.{re.escape(region)}\.{domain}/ray:serve-ml-sagemaker-{flavour}-v1\.4"
    assert re.fullmatch(expected, uri), uri
    if domain.startswith("amazonaws"):  # the role policy names its repository
        arn = iam.ecr_repository_arn(uri, iam.partition_for_region(region))
        assert arn == f"arn:{iam.partition_for_region(region)}:ecr:{region}:{REGIONS[region]}:repository/ray"


def test_a_region_outside_the_map_says_how_to_give_the_uri() -> None:
    with pytest.raises(images.ServingImageError, match="pass --serving-image-uri"):
        images.ray_serve_image_uri("xx-nowhere-1", "ml.m5.large")
    override = "111122223333.dkr.ecr.xx-nowhere-1.amazonaws.com/mirror/ray:serve-ml-sagemaker-cpu-v1.4"
    assert images.serving_image_uri("xx-nowhere-1", "ml.m5.large", override=override) == override


@pytest.mark.parametrize(
    ("instance_type", "device"),
    [("ml.m5.large", "cpu"), ("ml.c6i.2xlarge", "cpu"), ("ml.g4dn.xlarge", "gpu"), ("ml.p4d.24xlarge", "gpu")],
)
def test_the_device_follows_the_instance_family(instance_type: str, device: str) -> None:
    assert images.device_for(instance_type) == device


@pytest.mark.parametrize(
    ("instance_type", "reason"),
    [
        ("ml.c7g.xlarge", "Graviton"),
        ("ml.m6gd.large", "Graviton"),
        ("ml.inf2.xlarge", "Neuron"),
        ("ml.trn1.2xlarge", "Neuron"),
        ("m5.large", "not a SageMaker instance type"),
    ],
)
def test_instances_the_images_cannot_run_on_are_refused_with_the_reason(instance_type: str, reason: str) -> None:
    with pytest.raises(images.ServingImageError, match=reason):
        images.serving_image_uri("us-east-1", instance_type)


def test_the_legacy_image_is_the_pytorch_2_6_one_and_warns_that_it_is_unpatched(capsys) -> None:
    uri = images.serving_image_uri("eu-west-1", "ml.m5.large", images.LEGACY_PYTORCH)
    assert re.fullmatch(r"763104351884\.dkr\.ecr\.eu-west-1\.amazonaws\.com/pytorch-inference:2\.6-cpu-py312", uri)
    images.check_supported(images.LEGACY_PYTORCH)
    warning = capsys.readouterr().err
    assert "past end of patches" in warning and config.LEGACY_INFERENCE_END_OF_PATCHES in warning
    images.check_supported(images.RAY_SERVE)
    assert capsys.readouterr().err == ""


def _args(**values: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    images.add_serving_arguments(parser)
    args = parser.parse_args([])
    for key, value in values.items():
        setattr(args, key, value)
    return args


def test_serverless_with_the_ray_serve_image_is_refused_and_allowed_knowingly_on_the_legacy_one(capsys) -> None:
    with pytest.raises(images.ServingImageError, match="serverless endpoint cannot use the Ray Serve image"):
        images.serving_options(_args(serverless_memory_mb=2048, endpoint_instance_type="ml.m5.large"))
    options = images.serving_options(_args(serving_image=images.LEGACY_PYTORCH, serverless_memory_mb=2048))
    assert options["serving_image"] == images.LEGACY_PYTORCH
    assert "past end of patches" in capsys.readouterr().err


def test_the_endpoint_instance_and_the_registered_image_must_be_the_same_device() -> None:
    with pytest.raises(images.ServingImageError, match="make them agree"):
        images.serving_options(_args(endpoint_instance_type="ml.g5.xlarge"))
    gpu = _args(endpoint_instance_type="ml.g5.xlarge", serving_instance_type="ml.g5.2xlarge")
    options = images.serving_options(gpu)
    assert options["serving_instance_type"] == "ml.g5.2xlarge"


# --- the registered model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def definitions() -> dict[str, dict[str, Any]]:
    from test_pipeline import _build, offline_aws

    with offline_aws():
        return {
            "legacy": _build(serving_image=images.LEGACY_PYTORCH),
            "gpu": _build(serving_instance_type="ml.g5.xlarge"),
        }


def _registered(definition: dict[str, Any]) -> dict[str, Any]:
    def walk(steps: list[dict[str, Any]]) -> Any:
        for step in steps:
            if step["Type"] == "RegisterModel":
                return step["Arguments"]
            found = walk(step.get("Arguments", {}).get("IfSteps", []) + step.get("Arguments", {}).get("ElseSteps", []))
            if found:
                return found
        return None

    return walk(definition["Steps"])


def test_the_legacy_setting_registers_the_pytorch_2_6_image(definitions) -> None:
    register = _registered(definitions["legacy"])
    (container,) = register["InferenceSpecification"]["Containers"]
    assert "/pytorch-inference:2.6-cpu-py312" in container["Image"]
    assert container["FrameworkVersion"] == config.INFERENCE_FRAMEWORK_VERSION
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"


def test_a_gpu_serving_instance_registers_the_cuda_build_for_gpu_instances_only(definitions) -> None:
    register = _registered(definitions["gpu"])
    (container,) = register["InferenceSpecification"]["Containers"]
    assert container["Image"].endswith("/ray:serve-ml-sagemaker-cuda-v1.4")
    assert container["FrameworkVersion"] == config.RAY_SERVE_TORCH_VERSION
    assert register["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"] == [
        "ml.g5.xlarge",
        "ml.g4dn.xlarge",
    ]


def test_the_role_may_pull_the_chosen_serving_image_and_not_the_other() -> None:
    def pull_resources(**options: Any) -> list[str]:
        policy = iam.render_pipeline_role_policy(region="us-east-1", account_id=ACCOUNT_ID, bucket="b-1", **options)
        statements = [s for s in policy["Statement"] if "ecr:BatchGetImage" in json.dumps(s.get("Action"))]
        return [arn for statement in statements for arn in statement["Resource"]]

    ray_repository = "arn:aws:ecr:us-east-1:763104351884:repository/ray"
    legacy_repository = "arn:aws:ecr:us-east-1:763104351884:repository/pytorch-inference"
    default = pull_resources()
    assert ray_repository in default and legacy_repository not in default
    legacy = pull_resources(serving_image=images.LEGACY_PYTORCH)
    assert legacy_repository in legacy and ray_repository not in legacy


def test_the_local_ray_pin_is_the_images_ray() -> None:
    setup = (ROOT / "setup.py").read_text()
    assert f'"ray[serve]=={config.RAY_SERVE_VERSION}"' in setup and '"protobuf<7"' in setup
