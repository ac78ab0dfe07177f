"""The project's CloudFormation template (``infra/project.yml``) made complete from the project's own sources.

``infra/project.yml`` writes everything about the stack except what other files of the project already own:

- each role's ``PolicyDocument`` / ``AssumeRolePolicyDocument`` names the policy file it comes from
  (``pipelines/aws/iam/*.json``, ``steps/deploy_*.json``). :func:`render_template` puts that file's statements in,
  with its ``${...}`` placeholders as ``Fn::Sub`` variables, keeping exactly the statements that
  ``pipelines.aws.iam.render_pipeline_role_policy`` / ``pipelines.aws.deploy_infra.render_deploy_policy`` keep
  when no KMS
  key, VPC, extra input, autoscaling or rollback alarm is asked for;
- ``${Name}`` in a ``Fn::Sub`` stands for ``Metadata.ProjectNames.Name`` (the names made from ProjectName), so
  that every name is written once; the policy files' placeholders are names of that table too;
- ``Mappings.EcrRegistries`` holds, per region, the account of each container registry the pipeline's jobs pull
  from (found with the SageMaker SDK, as ``pipelines.aws.iam`` finds them), and ``Rules`` keeps the stack to those
  regions.

A placeholder that nothing fills stops the rendering with an error that names it and says where to add it.
Rendering is offline (no AWS call) and deterministic: the same sources give the same bytes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines import config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = PROJECT_ROOT / "infra" / "project.yml"
NAMES_KEY = "ProjectNames"  # Metadata.ProjectNames: the names made from ProjectName
REGISTRY_MAPPING = "EcrRegistries"
STACK_PARTITION = "aws"
_ECR_LIST_PLACEHOLDER = "${EcrRepositoryArns}"
_PLACEHOLDER = re.compile(r"\$\{([^}!][^}]*)\}")
_ECR_IMAGE = re.compile(
    r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/(?P<repo>[^:@]+)"
)
# Values the template takes from the project's config (written once there), usable as ${Name} like the names.
CONFIG_NAMES = {"EndpointNamePrefix": config.ENDPOINT_NAME_PREFIX}
PSEUDO_PARAMETERS = (
    "AWS::AccountId",
    "AWS::NotificationARNs",
    "AWS::NoValue",
    "AWS::Partition",
    "AWS::Region",
    "AWS::StackId",
    "AWS::StackName",
    "AWS::URLSuffix",
)


class TemplateError(ValueError):
    """The template or a policy source has something rendering cannot resolve; the message says what and where."""


# --- reading YAML with CloudFormation's short forms ------------------------------------------------------------


class _CloudFormationLoader(yaml.SafeLoader):
    """A safe loader that reads ``!Ref x`` as ``{"Ref": "x"}``, ``!Sub s`` as ``{"Fn::Sub": s}`` and so on."""


def _short_form(function: str) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if function == "Fn::GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {function: value}

    return construct


for _tag in ("Ref", "Condition"):
    _CloudFormationLoader.add_constructor(f"!{_tag}", _short_form(_tag))
for _tag in (
    "And",
    "Base64",
    "Cidr",
    "Equals",
    "FindInMap",
    "GetAZs",
    "GetAtt",
    "If",
    "ImportValue",
    "Join",
    "Not",
    "Or",
    "Select",
    "Split",
    "Sub",
):
    _CloudFormationLoader.add_constructor(f"!{_tag}", _short_form(f"Fn::{_tag}"))


def load_yaml(text: str) -> Any:
    """Parse CloudFormation YAML (short forms become the long ``Fn::`` forms); nothing but plain data comes out."""
    return yaml.load(text, Loader=_CloudFormationLoader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(template: Mapping[str, Any]) -> str:
    """The template as YAML, long forms only, in the template's own order (the same template, the same bytes)."""

    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # no &anchors: every value written out where it is used

    return yaml.dump(template, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


# --- the policy files ------------------------------------------------------------------------------------------


def _policy_sources() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Policy file (as the template names it) -> (its document, the Sid prefixes of statements left out)."""
    from pipelines.aws import deploy_infra, iam

    return {
        "pipelines/aws/iam/pipeline_role_policy.json": (
            iam.pipeline_role_policy_template(),
            # KMS, VPC and extra inputs are upsert options the stack does not take (docs/iam.md: the pipeline role).
            (iam.KMS_SID_PREFIX, iam.VPC_SID_PREFIX, iam.EXTRA_INPUTS_SID_PREFIX),
        ),
        "pipelines/aws/iam/pipeline_role_trust_policy.json": (iam.pipeline_role_trust_policy(), ()),
        "steps/deploy_policy.json": (
            json.loads((PROJECT_ROOT / "steps" / deploy_infra.POLICY_TEMPLATE).read_text(encoding="utf-8")),
            # Endpoint autoscaling and rollback alarms are deploy options the stack does not take.
            (deploy_infra.AUTOSCALING_SID_PREFIX, deploy_infra.ROLLBACK_ALARMS_SID_PREFIX),
        ),
        "steps/deploy_trust_policy.json": (deploy_infra.trust_policy(), ()),
    }


def _ecr_repository_arns(images: Registries) -> list[dict[str, Any]]:
    """One ``Fn::Sub`` per repository, its account looked up for the stack's region in Mappings.EcrRegistries."""
    return [
        {
            "Fn::Sub": [
                f"arn:${{AWS::Partition}}:ecr:${{AWS::Region}}:${{Account}}:repository/{repository}",
                {"Account": {"Fn::FindInMap": [REGISTRY_MAPPING, {"Ref": "AWS::Region"}, key]}},
            ]
        }
        for key, repository in sorted(images.repositories.items())
    ]


def _policy_document(source: str, images: Registries) -> dict[str, Any]:
    """The policy file's document for the template: statements filtered, placeholders left for Fn::Sub."""
    sources = _policy_sources()
    if source not in sources:
        raise TemplateError(f"policy document {source!r} of the template is none of the policy files {sorted(sources)}")
    document, left_out = sources[source]

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return {"Fn::Sub": value} if "${" in value else value
        if isinstance(value, Mapping):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, list):
            items: list[Any] = []
            for item in value:
                items.extend(_ecr_repository_arns(images) if item == _ECR_LIST_PLACEHOLDER else [convert(item)])
            return items
        return value

    statements = document["Statement"]
    kept = [s for s in statements if not str(s.get("Sid", "")).startswith(left_out)] if left_out else statements
    return {"Version": document["Version"], "Statement": [convert(statement) for statement in kept]}


# --- container registries ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registries:
    """Where the pipeline's container images live: per region, the account of each repository."""

    accounts: dict[str, dict[str, str]]  # region -> {repository key: registry account}
    repositories: dict[str, str]  # repository key (alphanumeric, as mapping keys must be) -> repository name


def _registry_key(repository: str) -> str:
    """``pytorch-training`` -> ``PytorchTraining``."""
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", repository) if part)


@contextlib.contextmanager
def _endpoint_table_read_once() -> Iterator[None]:
    """The SDK parses botocore's endpoint table (megabytes of JSON) again for every image it looks up; over all
    regions that is most of the rendering time, so the table is parsed once while the lookups run."""
    from sagemaker import utils

    original = getattr(utils, "_botocore_resolver", None)
    if original is None:  # an SDK that does not have it: nothing to speed up
        yield
        return
    utils._botocore_resolver = _cached_resolver(original)
    try:
        yield
    finally:
        utils._botocore_resolver = original


@functools.lru_cache(maxsize=1)
def _cached_resolver(resolver: Any) -> Any:
    result = resolver()
    return lambda: result


@functools.lru_cache(maxsize=1)
def registries() -> Registries:
    """The registries of every commercial region where all the pipeline's images exist.

    The images are the ones ``pipelines.aws.iam.pipeline_image_uris`` names (the SDK's tables, offline).
    """
    import boto3

    from pipelines.aws.iam import pipeline_image_uris

    # The SDK logs its config lookups to standard output when it is imported, and a line per image lookup: keep
    # them out of a template written to standard output.
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    for name in ("sagemaker", "sagemaker.config"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The commercial partition only: the China and GovCloud partitions lack resource types the stack creates
    # (SageMaker model package groups, CodeConnections sources) in some or all of their regions.
    regions = boto3.session.Session().get_available_regions("sagemaker", partition_name=STACK_PARTITION)
    accounts: dict[str, dict[str, str]] = {}
    repositories: dict[str, str] = {}
    for region in regions:
        try:
            with _endpoint_table_read_once():
                uris = pipeline_image_uris(region)
        except ValueError:  # an image not published in this region: the stack cannot run there
            continue
        row = {}
        for uri in uris:
            match = _ECR_IMAGE.match(uri)
            if match is None:
                raise TemplateError(f"container image {uri!r} is not an ECR image URI")
            key = _registry_key(match["repo"])
            repositories[key] = match["repo"]
            row[key] = match["account"]
        accounts[region] = row
    if not accounts:
        raise TemplateError("the SageMaker SDK names no region where all of the pipeline's images exist")
    return Registries(accounts=accounts, repositories=repositories)


# --- names -----------------------------------------------------------------------------------------------------


def _names(template: Mapping[str, Any]) -> dict[str, str]:
    """Metadata.ProjectNames plus the config's values, each expanded until it refers to no other name."""
    table = {**CONFIG_NAMES, **(template.get("Metadata", {}).get(NAMES_KEY) or {})}
    expanded: dict[str, str] = {}

    def expand(name: str, seen: tuple[str, ...]) -> str:
        if name in expanded:
            return expanded[name]
        if name in seen:
            raise TemplateError(f"Metadata.{NAMES_KEY} names refer to each other in a circle: {' -> '.join(seen)}")
        value = _PLACEHOLDER.sub(
            lambda m: expand(m.group(1), (*seen, name)) if m.group(1) in table else m.group(0), str(table[name])
        )
        expanded[name] = value
        return value

    for name in table:
        expand(name, ())
    return expanded


def _sub_strings(node: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every ``Fn::Sub`` node in the template, with its variables map (empty for the one-string form)."""
    if isinstance(node, dict):
        if "Fn::Sub" in node:
            value = node["Fn::Sub"]
            yield node, (value[1] if isinstance(value, list) else {})
        for item in node.values():
            yield from _sub_strings(item)
    elif isinstance(node, list):
        for item in node:
            yield from _sub_strings(item)


def _set_sub_string(node: dict[str, Any], text: str) -> None:
    if isinstance(node["Fn::Sub"], list):
        node["Fn::Sub"] = [text, node["Fn::Sub"][1]]
    else:
        node["Fn::Sub"] = text


def _check_references(template: Mapping[str, Any], node: dict[str, Any], variables: Mapping[str, Any]) -> None:
    text = node["Fn::Sub"][0] if isinstance(node["Fn::Sub"], list) else node["Fn::Sub"]
    known = {*PSEUDO_PARAMETERS, *template.get("Parameters", {}), *template.get("Resources", {}), *variables}
    for reference in _PLACEHOLDER.findall(text):
        name = reference.split(".", 1)[0] if "." in reference else reference
        if name not in known:
            raise TemplateError(
                f"${{{reference}}} in {text!r} is no parameter, resource or name of the template: if a policy file "
                f"gained a placeholder, add it under Metadata.{NAMES_KEY} in {TEMPLATE_PATH.name}"
            )


# --- the whole template ----------------------------------------------------------------------------------------


def _fill_policy_documents(node: Any, images: Registries, extra: Mapping[str, list[Any]]) -> Any:
    """Each named policy file's document, with the ``extra`` statements of that file appended."""
    if isinstance(node, dict):
        filled = {}
        for key, value in node.items():
            if key in ("PolicyDocument", "AssumeRolePolicyDocument") and isinstance(value, str):
                document = _policy_document(value, images)
                document["Statement"] = [*document["Statement"], *extra.get(value, [])]
                filled[key] = document
            else:
                filled[key] = _fill_policy_documents(value, images, extra)
        return filled
    if isinstance(node, list):
        return [_fill_policy_documents(item, images, extra) for item in node]
    return node


def mlflow_statements(mlflow_tracking_arn: str | None) -> dict[str, list[dict[str, Any]]]:
    """Policy file -> the statements a tracked pipeline adds to it (``upsert --mlflow-tracking-arn`` in the stack's
    UpsertArguments): the pipeline role's and the deploy function's, each as its own renderer writes it. None: no
    statement anywhere."""
    if mlflow_tracking_arn is None:
        return {}
    from pipelines.aws import deploy_infra, iam

    return {
        "pipelines/aws/iam/pipeline_role_policy.json": [iam.mlflow_statement(mlflow_tracking_arn)],
        "steps/deploy_policy.json": [
            iam.mlflow_statement(mlflow_tracking_arn, deploy_infra.MLFLOW_TAG_ACTIONS, deploy_infra.MLFLOW_SID)
        ],
    }


def skeleton() -> dict[str, Any]:
    """``infra/project.yml`` as it is in the repository (policy documents named, not filled in)."""
    return load_yaml(TEMPLATE_PATH.read_text(encoding="utf-8"))


def render_template(
    template: Mapping[str, Any] | None = None, mlflow_tracking_arn: str | None = None
) -> dict[str, Any]:
    """The complete template: policies from their files, names expanded, registries and region rule added; with
    ``mlflow_tracking_arn``, the roles' MLflow statements on that ARN (:func:`mlflow_statements`).

    Raises:
        TemplateError: naming what could not be resolved and where to fix it.
        ValueError: the MLflow ARN is no tracking server's or app's.
    """
    source = copy.deepcopy(dict(template) if template is not None else skeleton())
    images = registries()
    rendered = _fill_policy_documents(source, images, mlflow_statements(mlflow_tracking_arn))
    names = _names(rendered)
    for node, variables in _sub_strings(rendered):
        text = node["Fn::Sub"][0] if isinstance(node["Fn::Sub"], list) else node["Fn::Sub"]
        usable = {name: value for name, value in names.items() if name not in variables}  # a variable wins
        _set_sub_string(node, _PLACEHOLDER.sub(lambda m, usable=usable: usable.get(m.group(1), m.group(0)), text))
        _check_references(rendered, node, variables)
    metadata = {key: value for key, value in rendered.get("Metadata", {}).items() if key != NAMES_KEY}
    if metadata:
        rendered["Metadata"] = metadata
    else:
        rendered.pop("Metadata", None)  # the names are expanded: CloudFormation has no use for the table
    rendered["Mappings"] = {**rendered.get("Mappings", {}), REGISTRY_MAPPING: images.accounts}
    rendered["Rules"] = {
        **rendered.get("Rules", {}),
        "RegionHasThePipelinesImages": {
            "Assertions": [
                {
                    "Assert": {"Fn::Contains": [sorted(images.accounts), {"Ref": "AWS::Region"}]},
                    "AssertDescription": "The pipeline's container images are published in these regions only: "
                    f"{', '.join(sorted(images.accounts))}. Create the stack in one of them.",
                }
            ]
        },
    }
    return _ordered(rendered)


def _ordered(template: dict[str, Any]) -> dict[str, Any]:
    """Sections in CloudFormation's customary order, the rest after them."""
    order = ("AWSTemplateFormatVersion", "Description", "Metadata", "Parameters", "Rules", "Mappings")
    head = {key: template[key] for key in order if key in template}
    return {**head, **{key: value for key, value in template.items() if key not in head}}


def names_for(project_name: str, template: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The names the stack gives for a project name (only the ones made from ProjectName alone)."""
    names = _names(template if template is not None else skeleton())
    concrete = {key: value.replace("${ProjectName}", project_name) for key, value in names.items()}
    return {key: value for key, value in concrete.items() if "${" not in value}


def template_text(template: Mapping[str, Any] | None = None) -> str:
    """The complete template as YAML, with a header saying where it comes from."""
    rendered = template if template is not None else render_template()
    header = (
        "# Rendered by `python -m pipelines.run bootstrap --print-template` from infra/project.yml and the project's\n"
        "# policy files. Deploy with CAPABILITY_IAM; parameters: ProjectName, ConnectionArn, Repository, Branch,\n"
        "# ArtifactRetentionDays (see Parameters).\n"
    )
    return header + dump_yaml(rendered)
