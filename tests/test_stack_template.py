"""The project's CloudFormation template: lint-clean, roles equal to the policies the project renders, names that
fit, and a CodeBuild project that sets every variable buildspec.yml reads."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _cloudformation import api_request, rendered_pipeline_role_policy, resolve

from pipelines import config
from pipelines.aws import deploy_infra, iam, stack_template
from steps import deploy

REPO = Path(__file__).resolve().parent.parent
ACCOUNT = "111122223333"
PROJECT = "vision-prod"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return stack_template.render_template()


def _regions(template: dict[str, Any]) -> list[str]:
    assertion = template["Rules"]["RegionHasThePipelinesImages"]["Assertions"][0]["Assert"]
    return assertion["Fn::Contains"][0]


def _values(template: dict[str, Any], region: str, project: str = PROJECT) -> dict[str, str]:
    """What CloudFormation would resolve Ref / Fn::GetAtt to, for a stack in ``region``."""
    return {
        "AWS::Partition": "aws",
        "AWS::Region": region,
        "AWS::AccountId": ACCOUNT,
        "ProjectName": project,
        "ArtifactBucket": "stack-artifactbucket-1a2b3c",
        "ArtifactBucket.Arn": "arn:aws:s3:::stack-artifactbucket-1a2b3c",
        "PipelineExecutionRole": "stack-PipelineExecutionRole-X1",
        "PipelineExecutionRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/stack-PipelineExecutionRole-X1",
        "DeployFunctionRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/stack-DeployFunctionRole-X2",
        "BuildRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/stack-BuildRole-X3",
        "CodePipelineRole.Arn": f"arn:aws:iam::{ACCOUNT}:role/stack-CodePipelineRole-X4",
        "ArtifactRetentionDays": "30",
        "BuildProject": f"{project}-build",
        "BuildProject.Arn": f"arn:aws:codebuild:{region}:{ACCOUNT}:project/{project}-build",
        "CodePipeline": project,
        "UpsertArguments": "",
        "Repository": "owner/repo",
        "Branch": "release/2.x",
        "ConnectionArn": f"arn:aws:codeconnections:{region}:{ACCOUNT}:connection/{'0' * 8}-0000-0000-0000-{'0' * 12}",
    }


# --- cfn-lint --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cfn_lint_is_clean_in_every_region_the_template_allows(template: dict[str, Any]) -> None:
    from cfnlint.api import ManualArgs, lint

    text = stack_template.template_text(template)
    # Every rule, informational ones included, in the first region.
    every_rule = ManualArgs(include_checks=["I"], regions=["us-east-1"])
    assert [str(match) for match in lint(text, config=every_rule)] == []
    # Every region the stack may be created in (a resource type missing in one of them fails here).
    # E3701 alone is left out of this run: it keeps the artifact names it has seen across the groups of regions
    # cfn-lint validates one after another, so with more than one group it reports the source stage's one output
    # artifact as defined twice. The first run checks it, and test_codepipeline_runs_the_build_on_every_push below
    # checks the artifact wiring itself.
    all_regions = ManualArgs(include_checks=["I"], ignore_checks=["E3701"], regions=_regions(template))
    assert [str(match) for match in lint(text, config=all_regions)] == []


def test_the_printed_template_reads_back_as_the_rendered_one(template: dict[str, Any]) -> None:
    text = stack_template.template_text(template)
    assert stack_template.load_yaml(text) == template
    assert stack_template.template_text(stack_template.render_template()) == text  # byte-stable


# --- the roles are the project's policies ----------------------------------------------------------------------


def _resources_as_set(statement: dict[str, Any]) -> dict[str, Any]:
    return {**statement, "Resource": sorted(statement["Resource"])} if "Resource" in statement else statement


def _policy_of(template: dict[str, Any], logical_id: str, values: dict[str, str]) -> dict[str, Any]:
    resource = template["Resources"][logical_id]["Properties"]
    document = resource["PolicyDocument"] if "PolicyDocument" in resource else resource["Policies"][0]["PolicyDocument"]
    return resolve(document, template, values)


@pytest.mark.slow
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "ap-east-1"])
def test_roles_carry_the_policies_the_project_renders_statement_for_statement(
    template: dict[str, Any], region: str
) -> None:
    values = _values(template, region)
    role_arn = values["PipelineExecutionRole.Arn"]
    pipeline_policy = rendered_pipeline_role_policy(
        region=region, account_id=ACCOUNT, bucket=values["ArtifactBucket"], project=PROJECT, role_arn=role_arn
    )
    deploy_policy = deploy_infra.render_deploy_policy(
        region=region,
        account_id=ACCOUNT,
        execution_role_arn=role_arn,
        model_package_group=f"{PROJECT}-models",
        function_name=f"{PROJECT}-deploy-on-approval",
    )
    for logical_id, expected in (("PipelineExecutionPolicy", pipeline_policy), ("DeployFunctionRole", deploy_policy)):
        actual = _policy_of(template, logical_id, values)
        assert actual["Version"] == expected["Version"]
        assert [s["Sid"] for s in actual["Statement"]] == [s["Sid"] for s in expected["Statement"]], logical_id
        for mine, theirs in zip(actual["Statement"], expected["Statement"], strict=True):
            # The renderer sorts image repositories by ARN, account first; the template cannot know the account
            # before the region, so it lists them by name. IAM reads a Resource list as a set.
            assert _resources_as_set(mine) == _resources_as_set(theirs), f"{logical_id}: statement {theirs['Sid']}"
    resources = template["Resources"]
    assert resources["PipelineExecutionRole"]["Properties"]["AssumeRolePolicyDocument"] == (
        iam.pipeline_role_trust_policy()
    )
    assert resources["DeployFunctionRole"]["Properties"]["AssumeRolePolicyDocument"] == deploy_infra.trust_policy()
    assert resources["PipelineExecutionPolicy"]["Properties"]["Roles"] == [{"Ref": "PipelineExecutionRole"}]


def test_a_placeholder_nothing_fills_stops_the_rendering_and_says_where_to_add_it() -> None:
    skeleton = stack_template.skeleton()
    broken = copy.deepcopy(skeleton)
    broken["Outputs"]["JobPrefix"]["Value"] = {"Fn::Sub": "${DeployQueueName}"}
    with pytest.raises(stack_template.TemplateError, match=r"\$\{DeployQueueName\}.*Metadata\.ProjectNames"):
        stack_template.render_template(broken)
    unknown_file = copy.deepcopy(skeleton)
    unknown_file["Resources"]["DeployFunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"] = "steps/x.json"
    with pytest.raises(stack_template.TemplateError, match=r"steps/x\.json"):
        stack_template.render_template(unknown_file)


# --- names and account IDs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("project", ["ab", "imgclf", "a" * 19 + "z"])
def test_names_fit_their_services_and_match_what_the_deploy_function_derives(project: str) -> None:
    spec = stack_template.skeleton()["Parameters"]["ProjectName"]
    assert re.fullmatch(spec["AllowedPattern"], project) and len(project) <= spec["MaxLength"]
    names = stack_template.names_for(project)
    group = names["ModelPackageGroupName"]
    # The deploy policy names the endpoint the function will derive from the group: the same name, no hash tail.
    assert names["ResourceBaseName"] == deploy.resource_base_name(config.ENDPOINT_NAME_PREFIX, group)
    assert names["EndpointName"] == names["EndpointArnName"] == names["ResourceBaseName"]
    # Names in ARNs are the names themselves (SageMaker writes them in lower case).
    assert names["PipelineArnName"] == names["PipelineName"].lower() == names["PipelineName"]
    assert names["ModelPackageGroupArnName"] == group.lower() == group
    for name in (names["PipelineName"], group, names["JobPrefix"], names["FunctionName"], names["DeployRuleName"]):
        assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", name) and len(name) <= 63
    # CodePipeline files a run's artifacts under the first 20 characters of its name: the lifecycle rule's prefix.
    assert len(names["CodePipelineName"]) <= 20


def test_no_account_id_but_the_public_image_registries(template: dict[str, Any]) -> None:
    raw = (REPO / "infra" / "project.yml").read_text()
    assert not re.search(r"(?<![0-9])[0-9]{12}(?![0-9])", raw)
    outside_mappings = {key: value for key, value in template.items() if key != "Mappings"}
    assert not re.search(r"(?<![0-9])[0-9]{12}(?![0-9])", yaml.safe_dump(outside_mappings))
    registries = template["Mappings"]["EcrRegistries"]
    region = "eu-west-1"
    images = iam.pipeline_image_uris(region)
    assert sorted(registries[region].values()) == sorted(image.split(".")[0] for image in images)


# --- the build -------------------------------------------------------------------------------------------------


def _buildspec() -> dict[str, Any]:
    return yaml.safe_load((REPO / "buildspec.yml").read_text())


def _buildspec_commands() -> list[str]:
    return [command for phase in _buildspec()["phases"].values() for command in phase.get("commands", [])]


def _variables_read(commands: list[str]) -> set[str]:
    read = {name for command in commands for pair in re.findall(r"\$\{(\w+)|\$(\w+)", command) for name in pair if name}
    assigned = {match for command in commands for match in re.findall(r"^(\w+)=", command)}
    return read - assigned


def test_the_build_project_sets_every_variable_the_buildspec_reads_and_no_other(template: dict[str, Any]) -> None:
    environment = template["Resources"]["BuildProject"]["Properties"]["Environment"]["EnvironmentVariables"]
    set_by_project = {variable["Name"] for variable in environment}
    read = _variables_read(_buildspec_commands())
    set_by_codebuild = {name for name in read if name.startswith("CODEBUILD_")} | {"AWS_REGION"}
    assert read - set_by_codebuild == set_by_project
    # The ones the CLI also reads from the environment are the ones the config names.
    assert {config.ENV_ROLE_ARN, config.ENV_BUCKET, config.ENV_DEPLOY_ROLE_ARN} <= set_by_project
    assert "variables" not in (_buildspec().get("env") or {})  # would override the project's values


def test_buildspec_commands_parse_with_the_values_the_stack_gives() -> None:
    """Every `python -m pipelines.run` line of the buildspec, with the project's variables as the stack sets them,
    is accepted by the CLI's own parser and upserts and starts the same pipeline under the stack's names."""
    import shlex

    from pipelines.run import build_parser

    rendered = stack_template.render_template()
    values = {**_values(rendered, "eu-west-1"), "UpsertArguments": "--no-debugger --use-spot-instances"}
    environment = {
        variable["Name"]: resolve(variable["Value"], rendered, values)
        for variable in rendered["Resources"]["BuildProject"]["Properties"]["Environment"]["EnvironmentVariables"]
    }
    environment.update(CODEBUILD_BUILD_ID="p:1", CODEBUILD_BUILD_NUMBER="7", CODEBUILD_RESOLVED_SOURCE_VERSION="ab")
    parsed = {}
    for command in _buildspec_commands():
        match = re.search(r"python -m pipelines\.run ([^)]*)", command)
        if match:
            expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: environment[m.group(1) or m.group(2)], match.group(1))
            argv = shlex.split(expanded)
            parsed[argv[0]] = build_parser().parse_args(argv)
    assert set(parsed) == {"upsert", "start"}
    upsert, start = parsed["upsert"], parsed["start"]
    names = stack_template.names_for(PROJECT)
    assert upsert.pipeline_name == start.pipeline_name == names["PipelineName"]
    assert upsert.model_package_group == names["ModelPackageGroupName"]
    assert upsert.base_job_prefix == names["JobPrefix"]
    assert (upsert.deploy_function_name, upsert.deploy_rule_name) == (names["FunctionName"], names["DeployRuleName"])
    assert upsert.role == values["PipelineExecutionRole.Arn"] and upsert.bucket == values["ArtifactBucket"]
    assert upsert.deploy_role_arn == values["DeployFunctionRole.Arn"]
    assert upsert.debugger is False and upsert.use_spot_instances is True  # UPSERT_ARGUMENTS reach upsert as flags
    assert not start.wait  # CodeBuild prints the ARN and ends; the pipeline runs on


def test_buildspec_installs_cpu_torch_then_tests_before_it_upserts() -> None:
    spec = _buildspec()
    assert str(spec["version"]) == "0.2"
    assert str(spec["phases"]["install"]["runtime-versions"]["python"]) == "3.11"
    install, tests = spec["phases"]["install"]["commands"], spec["phases"]["pre_build"]["commands"]
    assert "--index-url https://download.pytorch.org/whl/cpu torch torchvision" in install[0]
    assert install[-1] == 'python -m pip install -e ".[dev]"'  # what the README and CI install
    assert tests[0].startswith("python -m pytest")  # a failing test ends the build before the build phase
    build = spec["phases"]["build"]["commands"]
    assert "pipelines.run upsert" in build[0] and "pipelines.run start" in build[1]
    assert any("$EXECUTION_ARN" in command for command in build[2:])
    assert spec["cache"]["paths"] == ["/root/.cache/pip/**/*"]
    report = spec["reports"]["pytest"]
    assert report["file-format"] == "JUNITXML" and report["files"][0] in tests[0]


def test_build_project_keeps_the_pip_cache_in_the_bucket_and_reads_the_buildspec(template: dict[str, Any]) -> None:
    values = _values(template, "us-east-1")
    project = resolve(template["Resources"]["BuildProject"]["Properties"], template, values)
    assert project["Source"] == {"Type": "CODEPIPELINE", "BuildSpec": "buildspec.yml"}
    assert project["Cache"] == {"Type": "S3", "Location": f"{values['ArtifactBucket']}/codebuild-cache"}
    assert project["Environment"]["ComputeType"] == "BUILD_GENERAL1_MEDIUM"
    build_policy = _policy_of(template, "BuildRole", values)
    cache_statement = next(s for s in build_policy["Statement"] if s["Sid"] == "ReadWriteThePipCache")
    assert cache_statement["Resource"] == [f"{values['ArtifactBucket.Arn']}/codebuild-cache/*"]


def test_codepipeline_runs_the_build_on_every_push(template: dict[str, Any]) -> None:
    values = _values(template, "us-east-1")
    pipeline = resolve(template["Resources"]["CodePipeline"]["Properties"], template, values)
    source, build = pipeline["Stages"]
    action = source["Actions"][0]
    assert action["ActionTypeId"]["Provider"] == "CodeStarSourceConnection"
    assert action["Configuration"]["DetectChanges"] == "true"  # a push to the branch starts the pipeline
    configuration = action["Configuration"]
    assert (configuration["FullRepositoryId"], configuration["BranchName"]) == ("owner/repo", "release/2.x")
    assert configuration["ConnectionArn"] == values["ConnectionArn"]
    outputs = [
        artifact["Name"]
        for stage in pipeline["Stages"]
        for a in stage["Actions"]
        for artifact in a.get("OutputArtifacts", [])
    ]
    inputs = [artifact["Name"] for a in build["Actions"] for artifact in a.get("InputArtifacts", [])]
    assert len(outputs) == len(set(outputs)) and set(inputs) <= set(outputs)
    assert build["Actions"][0]["Configuration"]["ProjectName"] == values["BuildProject"]


def test_bucket_is_private_tls_only_versioned_encrypted_and_expires_build_artifacts(template: dict[str, Any]) -> None:
    values = _values(template, "us-east-1")
    bucket = resolve(template["Resources"]["ArtifactBucket"]["Properties"], template, values)
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert encryption["SSEAlgorithm"] in ("AES256", "aws:kms")
    rules = {rule["Id"]: rule for rule in bucket["LifecycleConfiguration"]["Rules"]}
    # Only CodePipeline's per-run prefix expires: the SageMaker pipeline's prefix holds the registered models.
    assert rules["ExpireOldCodePipelineArtifacts"]["Prefix"] == f"{PROJECT}/"
    assert not f"{PROJECT}-pipeline/".startswith(rules["ExpireOldCodePipelineArtifacts"]["Prefix"])
    policy = resolve(template["Resources"]["ArtifactBucketPolicy"]["Properties"]["PolicyDocument"], template, values)
    tls = next(s for s in policy["Statement"] if s["Sid"] == "DenyRequestsWithoutTls")
    assert tls["Effect"] == "Deny" and tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert set(tls["Resource"]) == {values["ArtifactBucket.Arn"], values["ArtifactBucket.Arn"] + "/*"}


# --- resource types moto's CloudFormation lacks: their properties against botocore's shapes ----------------------


@pytest.mark.parametrize(
    ("logical_id", "resource_type"),
    [
        ("ArtifactBucketPolicy", "AWS::S3::BucketPolicy"),
        ("ModelPackageGroup", "AWS::SageMaker::ModelPackageGroup"),
        ("BuildProject", "AWS::CodeBuild::Project"),
        ("CodePipeline", "AWS::CodePipeline::Pipeline"),
    ],
)
def test_properties_moto_cannot_create_fit_the_api_calls_cloudformation_makes(
    template: dict[str, Any], logical_id: str, resource_type: str
) -> None:
    resource = template["Resources"][logical_id]
    assert resource["Type"] == resource_type
    values = _values(template, "eu-west-1")
    _, problems = api_request(resource_type, resolve(resource["Properties"], template, values))
    assert problems == []


def test_the_shape_check_finds_what_is_wrong(template: dict[str, Any]) -> None:
    values = _values(template, "eu-west-1")
    project = resolve(copy.deepcopy(template["Resources"]["BuildProject"]["Properties"]), template, values)
    project["Environment"]["ComputeType"] = "BUILD_GENERAL9_HUGE"
    project["Environment"]["EnvironmentVariables"].append({"Name": "", "Value": "x"})
    project["Sourcce"] = project.pop("Source")
    _, problems = api_request("AWS::CodeBuild::Project", project)
    text = "\n".join(problems)
    assert "'BUILD_GENERAL9_HUGE' is not one of" in text
    assert "below the minimum 1" in text
    assert "unknown property 'Sourcce'" in text and "missing required 'source'" in text
    pipeline = resolve(copy.deepcopy(template["Resources"]["CodePipeline"]["Properties"]), template, values)
    pipeline["Stages"][0]["Actions"][0]["Configuration"]["DetectChanges"] = True  # the API takes strings only
    _, problems = api_request("AWS::CodePipeline::Pipeline", pipeline)
    assert any("DetectChanges" in problem and "expected a string" in problem for problem in problems)
