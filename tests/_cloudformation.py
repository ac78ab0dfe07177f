"""CloudFormation helpers for the tests: evaluate a template's values, check resource properties against botocore's
API shapes, and give moto the resource types its CloudFormation lacks.

moto's CloudFormation skips resource types it does not know (S3 bucket policies, SageMaker model package groups,
CodeBuild projects, CodePipelines). :func:`register_moto_resource_types` adds them: each one first checks its
properties against the botocore shape of the API call CloudFormation makes for it (members, required members,
types, enum values, lengths and patterns, as the pipeline definition checker does for SageMaker's API), then makes
the call against moto, so the stack's resources really exist and ``Ref``/``Fn::GetAtt`` resolve.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

# --- evaluating intrinsic functions ----------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\{([^}!][^}]*)\}")


def resolve(node: Any, template: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    """The value of a template node, with ``values`` for Ref names (parameters, pseudo parameters, resources) and
    ``"Resource.Attribute"`` keys for Fn::GetAtt."""
    if isinstance(node, list):
        return [resolve(item, template, values) for item in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"Ref"}:
        return values[node["Ref"]]
    if set(node) == {"Fn::GetAtt"}:
        return values[".".join(node["Fn::GetAtt"])]
    if set(node) == {"Fn::FindInMap"}:
        name, first, second = (resolve(part, template, values) for part in node["Fn::FindInMap"])
        return template["Mappings"][name][first][second]
    if set(node) == {"Fn::Join"}:
        separator, items = node["Fn::Join"]
        return separator.join(str(item) for item in resolve(items, template, values))
    if set(node) == {"Fn::Sub"}:
        text, variables = node["Fn::Sub"] if isinstance(node["Fn::Sub"], list) else (node["Fn::Sub"], {})
        scope = {**values, **{key: resolve(value, template, values) for key, value in variables.items()}}
        return _REFERENCE.sub(lambda match: str(scope[match.group(1)]), text)
    return {key: resolve(value, template, values) for key, value in node.items()}


def is_intrinsic(value: Any) -> bool:
    """A Ref, Condition or Fn:: node: its value is known at deploy time only."""
    if not (isinstance(value, dict) and len(value) == 1):
        return False
    key = next(iter(value))
    return key in ("Ref", "Condition") or key.startswith("Fn::")


# --- CloudFormation properties -> the API request, checked against botocore's shapes ---------------------------


# resource type -> (service, operation, member the properties go under (None: top level), renamed properties,
# properties that only CloudFormation knows and the API call does not take)
API_CALLS: dict[str, tuple[str, str, str | None, dict[str, str], tuple[str, ...]]] = {
    "AWS::CodeBuild::Project": ("codebuild", "CreateProject", None, {}, ()),
    "AWS::CodePipeline::Pipeline": (
        "codepipeline",
        "CreatePipeline",
        "pipeline",
        {"Tags": "tags"},
        ("RestartExecutionOnUpdate", "DisableInboundStageTransitions"),
    ),
    "AWS::SageMaker::ModelPackageGroup": (
        "sagemaker",
        "CreateModelPackageGroup",
        None,
        {},
        ("ModelPackageGroupPolicy",),
    ),
    "AWS::S3::BucketPolicy": ("s3", "PutBucketPolicy", None, {"PolicyDocument": "Policy"}, ()),
}


@functools.cache
def _service_model(service: str) -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model(service)


def api_request(resource_type: str, properties: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The API request CloudFormation makes for the resource, and the problems found building it."""
    service, operation, wrapper, renamed, cloudformation_only = API_CALLS[resource_type]
    shape = _service_model(service).operation_model(operation).input_shape
    problems: list[str] = []
    outer: dict[str, Any] = {}
    inner: dict[str, Any] = {}
    for key, value in properties.items():
        if key in cloudformation_only:
            continue
        if key in renamed:
            outer[renamed[key]] = json.dumps(value) if renamed[key] == "Policy" else value
        else:
            inner[key] = value
    request = _convert(
        {**inner, **outer} if wrapper is None else {**outer, wrapper: inner}, shape, resource_type, problems
    )
    return request, problems


def _member(shape: Any, key: str) -> str | None:
    """The shape's member for a CloudFormation property: same name, told apart by case only (Name / name)."""
    matches = [member for member in shape.members if member.lower() == key.lower()]
    return matches[0] if len(matches) == 1 else None


def _convert(value: Any, shape: Any, where: str, problems: list[str]) -> Any:
    kind = shape.type_name
    if is_intrinsic(value):
        return value  # known at deploy time only
    if kind == "structure":
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected an object ({shape.name}), got {value!r}")
            return value
        converted = {}
        for key, item in value.items():
            member = _member(shape, key)
            if member is None:
                problems.append(f"{where}: unknown property {key!r} of {shape.name}")
                continue
            converted[member] = _convert(item, shape.members[member], f"{where}.{key}", problems)
        for required in shape.required_members:
            if required not in converted:
                problems.append(f"{where}: missing required {required!r} of {shape.name}")
        return converted
    if kind == "list":
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list ({shape.name}), got {value!r}")
            return value
        _check_size(len(value), shape, where, problems)
        return [_convert(item, shape.member, f"{where}[{index}]", problems) for index, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a map ({shape.name}), got {value!r}")
            return value
        return {key: _convert(item, shape.value, f"{where}[{key!r}]", problems) for key, item in value.items()}
    return _convert_scalar(value, shape, where, problems)


def _convert_scalar(value: Any, shape: Any, where: str, problems: list[str]) -> Any:
    kind = shape.type_name
    if kind == "string":
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string ({shape.name}), got {value!r}")
            return value
        if shape.enum and value not in shape.enum:
            problems.append(f"{where}: {value!r} is not one of {shape.name}'s values {shape.enum}")
        _check_size(len(value), shape, where, problems)
        _check_pattern(value, shape, where, problems)
        return value
    if kind in ("integer", "long"):
        try:
            number = int(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected an integer ({shape.name}), got {value!r}")
            return value
        _check_size(number, shape, where, problems)
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        problems.append(f"{where}: expected true/false ({shape.name}), got {value!r}")
    return value


def _check_pattern(value: str, shape: Any, where: str, problems: list[str]) -> None:
    pattern = shape.metadata.get("pattern")
    if not pattern:
        return
    try:
        compiled = re.compile(pattern)
    except re.error:  # Java-only syntax (\p{L}, surrogate ranges): the service alone checks it
        return
    if not compiled.fullmatch(value):
        problems.append(f"{where}: {value!r} does not match {shape.name}'s pattern {pattern}")


def _check_size(size: int, shape: Any, where: str, problems: list[str]) -> None:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and size < low:
        problems.append(f"{where}: {size} is below the minimum {low} of {shape.name}")
    if high is not None and size > high:
        problems.append(f"{where}: {size} is above the maximum {high} of {shape.name}")


# --- moto: the resource types its CloudFormation lacks ----------------------------------------------------------


class ShapeProblems(Exception):
    """A resource's properties do not fit the API call CloudFormation would make."""


def _checked_request(resource_type: str, cloudformation_json: Mapping[str, Any]) -> dict[str, Any]:
    request, problems = api_request(resource_type, cloudformation_json.get("Properties", {}))
    if problems:
        raise ShapeProblems("; ".join(problems))
    return request


def patch_moto_cloudformation(monkeypatch: Any) -> None:
    """Make moto's CloudFormation do what the project's stack needs: the four resource types it lacks, and a
    change set execution that leaves the stack with the change set's template, parameters and outputs (moto keeps
    the stack's old ones)."""
    from moto.cloudformation.models import CloudFormationBackend

    register_moto_resource_types()
    original = CloudFormationBackend.execute_change_set

    def execute_change_set(self: Any, change_set_name: str, stack_name: str | None = None) -> None:
        original(self, change_set_name, stack_name)
        change_set = self.describe_change_set(change_set_name)
        stack = self.stacks[change_set.stack_id]
        stack._parse_template()
        stack.parameters = change_set.parameters
        stack.output_map = stack._create_output_map()

    monkeypatch.setattr(CloudFormationBackend, "execute_change_set", execute_change_set)


def register_moto_resource_types() -> None:
    """Teach moto's CloudFormation the four types the project's template uses and moto lacks (idempotent)."""
    from moto.cloudformation import parsing

    if "AWS::CodePipeline::Pipeline" not in parsing.get_model_map():
        _define_models()
        for cached in (parsing.get_model_list, parsing.get_model_map, parsing.get_name_type_map):
            cached.cache_clear()


# moto files each model class under the second part of its module's name.
_MOTO_MODULE = "tests.cloudformation_resources_for_tests"
_MODELS: list[type] = []  # keeps the classes alive: moto finds them through CloudFormationModel.__subclasses__()


def _create_bucket_policy(request: dict[str, Any], region: str) -> tuple[str, dict[str, str]]:
    import boto3

    boto3.client("s3", region_name=region).put_bucket_policy(**request)
    return request["Bucket"], {}


def _create_model_package_group(request: dict[str, Any], region: str) -> tuple[str, dict[str, str]]:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("sagemaker", region_name=region)
    try:
        arn = client.create_model_package_group(**request)["ModelPackageGroupArn"]
    except ClientError:  # exists already: CloudFormation imports it (ImportExistingResources)
        name = request["ModelPackageGroupName"]
        arn = client.describe_model_package_group(ModelPackageGroupName=name)["ModelPackageGroupArn"]
    return arn, {"ModelPackageGroupArn": arn}


def _create_project(request: dict[str, Any], region: str) -> tuple[str, dict[str, str]]:
    import boto3

    # moto wants a location for every source and artifacts type; AWS takes none when CodePipeline hands them over
    # and back.
    source = {"location": "from CodePipeline", **request["source"]}
    artifacts = {"location": "to CodePipeline", **request["artifacts"]}
    client = boto3.client("codebuild", region_name=region)
    project = client.create_project(**{**request, "source": source, "artifacts": artifacts})["project"]
    return project["name"], {"Arn": project["arn"]}


def _create_pipeline(request: dict[str, Any], region: str) -> tuple[str, dict[str, str]]:
    import boto3

    created = boto3.client("codepipeline", region_name=region).create_pipeline(**request)["pipeline"]
    return created["name"], {"Version": str(created.get("version", 1))}


def _delete(service: str, operation: str, key: str) -> Any:
    def delete(physical_id: str, region: str) -> None:
        import boto3

        getattr(boto3.client(service, region_name=region), operation)(**{key: physical_id})

    return delete


# resource type -> (make it: request, region -> (physical ID, attributes); delete it: physical ID, region)
_RESOURCE_TYPES: dict[str, tuple[Any, Any]] = {
    "AWS::S3::BucketPolicy": (_create_bucket_policy, _delete("s3", "delete_bucket_policy", "Bucket")),
    # DeletionPolicy RetainExceptOnCreate: the registry outlives the stack.
    "AWS::SageMaker::ModelPackageGroup": (_create_model_package_group, lambda physical_id, region: None),
    "AWS::CodeBuild::Project": (_create_project, _delete("codebuild", "delete_project", "name")),
    "AWS::CodePipeline::Pipeline": (_create_pipeline, _delete("codepipeline", "delete_pipeline", "name")),
}


def _define_models() -> None:
    from moto.core.common_models import CloudFormationModel

    class _Resource:
        """A resource made through its API call: its physical ID (what Ref returns) and Fn::GetAtt attributes."""

        TYPE = ""

        def __init__(self, physical_id: str, attributes: Mapping[str, str]) -> None:
            self.physical_resource_id = physical_id
            self.attributes = dict(attributes)

        @staticmethod
        def cloudformation_name_type() -> str:
            return ""

        @classmethod
        def cloudformation_type(cls) -> str:
            return cls.TYPE

        @classmethod
        def has_cfn_attr(cls, attribute: str) -> bool:
            return True

        def get_cfn_attribute(self, attribute: str) -> str:
            return self.attributes[attribute]

        def is_created(self) -> bool:
            return True

        @classmethod
        def create_from_cloudformation_json(  # type: ignore[override]
            cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str, **kwargs: Any
        ) -> Any:
            create, _ = _RESOURCE_TYPES[cls.TYPE]
            return cls(*create(_checked_request(cls.TYPE, cloudformation_json), region_name))

        @classmethod
        def update_from_cloudformation_json(  # type: ignore[override]
            cls,
            original_resource: Any,
            new_resource_name: str,
            cloudformation_json: Any,
            account_id: str,
            region_name: str,
        ) -> Any:
            cls.delete_from_cloudformation_json(original_resource.physical_resource_id, {}, account_id, region_name)
            return cls.create_from_cloudformation_json(new_resource_name, cloudformation_json, account_id, region_name)

        @classmethod
        def delete_from_cloudformation_json(  # type: ignore[override]
            cls, resource_name: str, cloudformation_json: Any, account_id: str, region_name: str
        ) -> None:
            _, delete = _RESOURCE_TYPES[cls.TYPE]
            delete(resource_name, region_name)

    for resource_type in _RESOURCE_TYPES:
        name = resource_type.replace("::", "")
        body = {"TYPE": resource_type, "__module__": _MOTO_MODULE}
        _MODELS.append(type(name, (_Resource, CloudFormationModel), body))


# --- what the project renders for the stack's names ------------------------------------------------------------


def rendered_pipeline_role_policy(*, region: str, account_id: str, bucket: str, project: str, role_arn: str) -> Any:
    """``pipelines.aws.iam.render_pipeline_role_policy`` for the names the stack gives a project."""
    import inspect

    from pipelines.aws import iam, stack_template

    names = stack_template.names_for(project)
    options = {
        "pipeline_name": names["PipelineName"],
        "model_package_group": names["ModelPackageGroupName"],
        "base_job_prefix": names["JobPrefix"],
        # The pipeline's Deploy step invokes the deploy function: its statement names the function where the
        # renderer takes the name.
        "deploy_function_name": names["DeployFunctionName"],
    }
    accepted = inspect.signature(iam.render_pipeline_role_policy).parameters
    options = {key: value for key, value in options.items() if key in accepted}
    return iam.render_pipeline_role_policy(
        region=region, account_id=account_id, bucket=bucket, role=role_arn, **options
    )
