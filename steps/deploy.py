"""Deploy on approval: the Lambda handler that serves an approved model package from a SageMaker endpoint.

EventBridge sends every "SageMaker Model Package State Change" event of the configured model package group
whose status is Approved here (``pipelines/aws/deploy_infra.py`` creates the rule, the function and its
permission). The handler

1. ignores (with a log line) any event that is not an approval of a package of ``MODEL_PACKAGE_GROUP_NAME``,
   and any package that is no longer Approved when it runs;
2. creates a SageMaker Model from the package, then an endpoint config (instances or serverless, optional data
   capture) -- both only if absent, under names derived from the package version, so a repeated event
   creates nothing twice;
3. creates the endpoint if absent, or moves it to the new config with UpdateEndpoint (blue/green, with the
   rollback alarms and traffic shifting from the environment). The config that is serving is never changed or
   deleted: SageMaker switches to the new one only once the new fleet is healthy;
4. registers target-tracking autoscaling on invocations per instance when MIN_CAPACITY/MAX_CAPACITY are set.

Whenever it handles a package of its group whose metadata names an MLflow run (a tracked pipeline's), it first
tags that run and its parent with the package's ARN, version and approval status (:func:`tag_mlflow_run`); with
tracking the rule sends rejections too, for that tag alone.

An endpoint that is busy (Creating, Updating, ...) raises :class:`EndpointBusyError`, which Lambda retries for
asynchronous (EventBridge) invocations. AWS errors are logged with the package ARN and re-raised.

The pipeline's Deploy step (a LambdaStep) invokes the same function with ``{"model_package_arn": ...}``, the
package its Register step just created: :func:`handle_pipeline_step` deploys it if it is Approved, returns
``awaiting-approval`` if it is PendingManualApproval, and in every case returns ``action``, ``endpoint_name`` and
``model_package_arn`` (the step's outputs). It starts the create or update and returns: a LambdaStep is bounded
in time, so it never waits for InService (autoscaling is then registered only on an endpoint already InService).

This file is zipped alone into the function: standard library and boto3 (in the Lambda runtime) only.
``python -m pipelines.run deploy --model-package-arn ...`` runs the same code by hand.

Its settings come from the function's environment, one variable per row of :data:`SETTINGS` (all strings, as
Lambda passes them). That table is the only place a setting is written down: :class:`DeploySettings`, its
parsing, the environment ``upsert`` gives the function, the command-line flags (``pipelines/aws/deploy_infra.py``)
and the settings table of docs/deployment.md are all made from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

try:  # boto3 is in the Lambda runtime; imported lazily elsewhere so this module loads without it
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - boto3/botocore are always installed where this runs

    class ClientError(Exception):  # type: ignore[no-redef]
        """Placeholder so ``except ClientError`` is valid without botocore."""


logger = logging.getLogger("deploy")
logger.setLevel(logging.INFO)  # until the settings' LOG_LEVEL is read (handler)

EVENT_SOURCE = "aws.sagemaker"
EVENT_DETAIL_TYPE = "SageMaker Model Package State Change"
APPROVED = "Approved"
REJECTED = "Rejected"
# What a tracked pipeline's rule sends the function: approvals to deploy, and rejections for the MLflow run's tag.
TRACKED_STATUSES = (APPROVED, REJECTED)
PENDING_APPROVAL = "PendingManualApproval"
AWAITING_APPROVAL = "awaiting-approval"  # the Deploy step's action for a package that waits for a person
PIPELINE_PAYLOAD_KEY = "model_package_arn"  # the Deploy LambdaStep's input
# SageMaker gives a LambdaStep's function at most 10 minutes: a busy endpoint is waited for at most this long.
PIPELINE_STEP_WAIT_SECONDS = 300
VARIANT_NAME = "AllTraffic"  # blue/green needs the same variant name in the old and the new config
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"

DEFAULT_BAKING_SECONDS_WITH_ALARMS = 300  # TRAFFIC_WAIT_SECONDS when unset and rollback alarms watch the update
TRAFFIC_ROUTING_TYPES = ("ALL_AT_ONCE", "CANARY", "LINEAR")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

MAX_NAME_LENGTH = 63  # SageMaker model, endpoint config and endpoint names
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
MAX_PREFIX_LENGTH = 20
# Room left after the base name for "-v<version>-<8 hex digits>".
_SUFFIX_ROOM = 21

# EndpointStatus values: the endpoint cannot take an UpdateEndpoint now, but will be able to later.
BUSY_STATUSES = frozenset({"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting", "OutOfService"})
# UpdateRollbackFailed is cleared by a new UpdateEndpoint, so it counts as updatable.
UPDATABLE_STATUSES = frozenset({"InService", "UpdateRollbackFailed"})


class DeployError(Exception):
    """A deployment that cannot go ahead; the message says why and what to do."""


class ConfigurationError(DeployError):
    """The function's environment (or the deploy command's flags) is invalid.

    ``settings`` holds the rows of :data:`SETTINGS` that are at fault, so a caller can name them its own way.
    """

    def __init__(self, message: str, settings: tuple[Setting, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


class EndpointBusyError(DeployError):
    """The endpoint is being created or updated: retryable. Lambda retries asynchronous invocations."""


class EndpointFailedError(DeployError):
    """The endpoint is Failed: SageMaker allows only DeleteEndpoint on it, so no retry will help."""


# --- settings: one table --------------------------------------------------------------------------------------

TEXT, INTEGER, NUMBER, NAMES, CHOICE = "text", "integer", "number", "names", "choice"
_TYPES = {TEXT: str, INTEGER: int, NUMBER: float, NAMES: tuple, CHOICE: str}


@dataclass(frozen=True)
class Rule:
    """What a text setting must look like: ``test`` says whether a value does, ``description`` says it in words."""

    test: Callable[[str], bool]
    description: str


ROLE_ARN_RULE = Rule(
    lambda value: value.startswith("arn:") and ":role/" in value, "an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
)
PREFIX_RULE = Rule(
    lambda value: bool(NAME_PATTERN.match(value)) and len(value) <= MAX_PREFIX_LENGTH,
    f"a name prefix (1-{MAX_PREFIX_LENGTH} letters, digits or hyphens)",
)
ENDPOINT_NAME_RULE = Rule(
    lambda value: bool(NAME_PATTERN.match(value)),
    "a valid endpoint name (1-63 letters, digits and hyphens, starting and ending with a letter or digit)",
)
INSTANCE_TYPE_RULE = Rule(lambda value: value.startswith("ml."), "a SageMaker instance type (ml.*)")
S3_URI_RULE = Rule(lambda value: value.startswith("s3://"), "an s3:// URI")


@dataclass(frozen=True)
class Setting:
    """One deploy setting, a row of :data:`SETTINGS`.

    Attributes:
        name: the :class:`DeploySettings` field; its flag is ``--<name with hyphens>``.
        env: the environment variable the function reads it from.
        kind: text, integer, number (a float > 0), names (comma-separated) or choice (one of ``choices``,
            any case).
        help: what it sets, in a phrase.
        default: the value when the variable is unset or empty; None means "off" (``default_help`` says what
            that means) unless ``required``.
        default_help: the default in words, where the value alone does not say it.
        minimum / maximum / multiple_of: bounds of an integer.
        choices: the values of a choice, in upper case.
        rule: what a text value must look like.
        required: no default: the function cannot run without it.
        flag: the flag that fills it: None for the table's own ``--<name>``; another name for a setting the
            command fills from a flag it has anyway (``--model-package-group``, ``--role``); "" for none at all
            (a value fixed by the project).
        only_for: "instances" or "serverless": left out of the environment of the other kind of endpoint.
    """

    name: str
    env: str
    kind: str
    help: str
    default: Any = None
    default_help: str = ""
    minimum: int | None = None
    maximum: int | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()
    rule: Rule | None = None
    required: bool = False
    flag: str | None = None
    only_for: str | None = None

    @property
    def flag_name(self) -> str | None:
        """The flag that fills this setting, or None when no flag does."""
        if self.flag is None:
            return "--" + self.name.replace("_", "-")
        return self.flag or None

    @property
    def has_own_flag(self) -> bool:
        """Whether the flag comes from this table (else the command adds it, or there is none)."""
        return self.flag is None

    def convert(self, text: str) -> Any:
        """``text`` as this setting's type (an empty text is unset: the default). Raises ValueError saying what
        is wrong, without naming the setting (the caller names the variable or the flag)."""
        text = text.strip()
        if not text:
            if self.required:
                raise ValueError(f"is not set ({self.help})")
            return self.default
        if self.kind == INTEGER:
            try:
                return int(text)
            except ValueError:
                raise ValueError("is not an integer") from None
        if self.kind == NUMBER:
            try:
                return float(text)
            except ValueError:
                raise ValueError("is not a number") from None
        if self.kind == NAMES:
            return tuple(item.strip() for item in text.split(",") if item.strip())
        if self.kind == CHOICE:
            return text.upper()
        return text

    def check(self, value: Any) -> None:
        """Raise ValueError saying what is wrong with a converted value (bounds, choices, rule)."""
        if value is None or value == self.default:
            return
        if self.kind == NUMBER and not value > 0:
            raise ValueError("must be > 0")
        if self.kind == CHOICE and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        if self.kind == INTEGER:
            low, high = self.minimum, self.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"must be >= {low}" if high is None else f"must be between {low} and {high}")
            if self.multiple_of and value % self.multiple_of:
                step = self.multiple_of
                raise ValueError(f"must be a multiple of {step} ({step}, {2 * step}, ... {high})")
        if self.rule is not None and not self.rule.test(value):
            raise ValueError(f"is not {self.rule.description}")

    def parse(self, text: str) -> Any:
        """The checked value of ``text`` (see :meth:`convert` and :meth:`check`)."""
        value = self.convert(text)
        self.check(value)
        return value

    def format(self, value: Any) -> str:
        """``value`` as the environment variable's text (what :meth:`parse` reads back)."""
        if self.kind == NAMES:
            return ",".join(value)
        return str(value)

    def describe(self) -> str:
        """The type and bounds in words, for help and documentation."""
        if self.kind == CHOICE:
            return " / ".join(self.choices)
        if self.kind == NAMES:
            return "comma-separated names"
        if self.kind == NUMBER:
            return "number > 0"
        if self.kind == INTEGER:
            bounds = f">= {self.minimum}" if self.maximum is None else f"{self.minimum}-{self.maximum}"
            return f"integer {bounds}" + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")
        return self.rule.description if self.rule is not None else "text"

    def describe_default(self) -> str:
        """The default in words."""
        if self.required:
            return "required"
        if self.default_help:
            return self.default_help
        return self.format(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model_package_group",
        "MODEL_PACKAGE_GROUP_NAME",
        TEXT,
        "the model package group to deploy: the only group whose approvals are deployed",
        required=True,
        flag="--model-package-group",
    ),
    Setting(
        "execution_role_arn",
        "EXECUTION_ROLE_ARN",
        TEXT,
        "the SageMaker execution role the model runs under",
        required=True,
        rule=ROLE_ARN_RULE,
        flag="--role",
    ),
    Setting(
        "resource_name_prefix",
        "RESOURCE_NAME_PREFIX",
        TEXT,
        "prefix of the model, endpoint config and default endpoint names (the deploy role's policy names them)",
        default="imgclf",
        rule=PREFIX_RULE,
        flag="",
    ),
    Setting(
        "endpoint_name",
        "ENDPOINT_NAME",
        TEXT,
        "endpoint to create or update",
        default="",
        default_help="<prefix>-<model package group>",
        rule=ENDPOINT_NAME_RULE,
    ),
    Setting(
        "endpoint_instance_type",
        "INSTANCE_TYPE",
        TEXT,
        "instance type of an instance-backed endpoint",
        default="ml.m5.large",
        rule=INSTANCE_TYPE_RULE,
        only_for="instances",
    ),
    Setting(
        "endpoint_instance_count",
        "INSTANCE_COUNT",
        INTEGER,
        "initial instance count",
        default=1,
        minimum=1,
        only_for="instances",
    ),
    Setting(
        "serverless_memory_mb",
        "SERVERLESS_MEMORY_MB",
        INTEGER,
        "serve from a serverless endpoint with this much memory instead of instances",
        default_help="instances",
        minimum=1024,
        maximum=6144,
        multiple_of=1024,
    ),
    Setting(
        "serverless_max_concurrency",
        "SERVERLESS_MAX_CONCURRENCY",
        INTEGER,
        "a serverless endpoint's most concurrent invocations",
        default=5,
        minimum=1,
        maximum=200,
        only_for="serverless",
    ),
    Setting(
        "data_capture_s3_uri",
        "DATA_CAPTURE_S3_URI",
        TEXT,
        "capture requests and responses to this s3:// prefix",
        default_help="no data capture",
        rule=S3_URI_RULE,
    ),
    Setting(
        "data_capture_percent",
        "DATA_CAPTURE_PERCENT",
        INTEGER,
        "percentage of requests captured",
        default=100,
        minimum=1,
        maximum=100,
    ),
    Setting(
        "rollback_alarm_names",
        "ROLLBACK_ALARM_NAMES",
        NAMES,
        "CloudWatch alarms that roll a blue/green update back",
        default=(),
        default_help="none",
    ),
    Setting(
        "traffic_routing",
        "TRAFFIC_ROUTING",
        CHOICE,
        "how a blue/green update shifts traffic to the new fleet",
        default="ALL_AT_ONCE",
        choices=TRAFFIC_ROUTING_TYPES,
    ),
    Setting(
        "traffic_step_percent",
        "TRAFFIC_STEP_PERCENT",
        INTEGER,
        "canary size or linear step, percent of capacity (CANARY and LINEAR need it)",
        default_help="none",
        minimum=1,
        maximum=100,
    ),
    Setting(
        "traffic_wait_seconds",
        "TRAFFIC_WAIT_SECONDS",
        INTEGER,
        "wait (baking) between traffic steps",
        default_help=f"{DEFAULT_BAKING_SECONDS_WITH_ALARMS} with rollback alarms, else 0",
        minimum=0,
        maximum=3600,
    ),
    Setting(
        "termination_wait_seconds",
        "TERMINATION_WAIT_SECONDS",
        INTEGER,
        "keep the old fleet this long after traffic has moved",
        default=0,
        minimum=0,
        maximum=3600,
    ),
    Setting(
        "max_execution_timeout_seconds",
        "MAX_EXECUTION_TIMEOUT_SECONDS",
        INTEGER,
        "roll back a blue/green update that takes longer than this",
        default_help="SageMaker's",
        minimum=600,
        maximum=14400,
    ),
    Setting(
        "min_capacity",
        "MIN_CAPACITY",
        INTEGER,
        "the fewest instances autoscaling keeps (set with the most, it turns autoscaling on)",
        default_help="no autoscaling",
        minimum=1,
    ),
    Setting(
        "max_capacity",
        "MAX_CAPACITY",
        INTEGER,
        "the most instances autoscaling adds (set with the fewest, it turns autoscaling on)",
        default_help="no autoscaling",
        minimum=1,
    ),
    Setting(
        "target_invocations_per_instance",
        "TARGET_INVOCATIONS_PER_INSTANCE",
        NUMBER,
        "autoscaling target: invocations per instance per minute",
        default=70.0,
        only_for="instances",
    ),
    Setting(
        "scale_in_cooldown_seconds",
        "SCALE_IN_COOLDOWN_SECONDS",
        INTEGER,
        "autoscaling: seconds after a scale-in activity before the next one",
        default=300,
        minimum=0,
        only_for="instances",
    ),
    Setting(
        "scale_out_cooldown_seconds",
        "SCALE_OUT_COOLDOWN_SECONDS",
        INTEGER,
        "autoscaling: seconds after a scale-out activity before the next one",
        default=60,
        minimum=0,
        only_for="instances",
    ),
    Setting(
        "endpoint_wait_seconds",
        "ENDPOINT_WAIT_SECONDS",
        INTEGER,
        "how long to wait for a busy endpoint (being created or updated) before failing with a retryable error",
        default=600,
        minimum=0,
    ),
    Setting(
        "endpoint_poll_seconds",
        "ENDPOINT_POLL_SECONDS",
        INTEGER,
        "seconds between looks at a busy endpoint",
        default=30,
        minimum=1,
    ),
    Setting("log_level", "LOG_LEVEL", CHOICE, "the function's logging level", default="INFO", choices=LOG_LEVELS),
)
SETTINGS_BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def _conflicts(values: Mapping[str, Any], label: Callable[[Setting], str]) -> list[tuple[str, tuple[str, ...]]]:
    """Rules between settings: (what is wrong, the names of the settings at fault)."""

    def named(name: str) -> str:
        return label(SETTINGS_BY_NAME[name])

    problems: list[tuple[str, tuple[str, ...]]] = []
    routing, step = values["traffic_routing"], values["traffic_step_percent"]
    if routing != "ALL_AT_ONCE" and step is None:
        problems.append(
            (
                f"{named('traffic_routing')}={routing} needs {named('traffic_step_percent')} "
                "(percent of capacity per step)",
                ("traffic_routing", "traffic_step_percent"),
            )
        )
    low, high = values["min_capacity"], values["max_capacity"]
    capacity = ("min_capacity", "max_capacity")
    if (low is None) != (high is None):
        problems.append(
            (
                f"{named('min_capacity')} and {named('max_capacity')} turn on autoscaling together: "
                "set both or neither",
                capacity,
            )
        )
    elif low is not None and low > high:
        problems.append((f"{named('min_capacity')}={low} is greater than {named('max_capacity')}={high}", capacity))
    if values["serverless_memory_mb"] is not None and (low is not None or high is not None):
        problems.append(
            (
                f"{named('min_capacity')}/{named('max_capacity')} scale instances; a serverless endpoint "
                f"({named('serverless_memory_mb')}) scales by itself up to {named('serverless_max_concurrency')}: "
                "unset one of them",
                ("serverless_memory_mb", *capacity),
            )
        )
    return problems


class _DeploySettingsMethods:
    """What :class:`DeploySettings` does besides holding the values of :data:`SETTINGS`."""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, label: Callable[[Setting], str] | None = None
    ) -> DeploySettings:
        """Parse and check every setting; raise :class:`ConfigurationError` naming every bad one.

        ``label`` names a setting in the messages (default: its environment variable; the deploy command
        passes its flags).
        """
        env = os.environ if environ is None else environ
        label = label or (lambda setting: setting.env)
        values: dict[str, Any] = {}
        problems: list[str] = []
        at_fault: list[Setting] = []
        for setting in SETTINGS:
            text = env.get(setting.env, "").strip()
            try:
                values[setting.name] = setting.parse(text)
            except ValueError as error:
                problems.append(f"{label(setting)}={text!r} {error}" if text else f"{label(setting)} {error}")
                at_fault.append(setting)
        if not problems:
            for problem, names in _conflicts(values, label):
                problems.append(problem)
                at_fault.extend(SETTINGS_BY_NAME[name] for name in names)
        if problems:
            raise ConfigurationError("invalid deploy settings: " + "; ".join(problems), tuple(at_fault))
        return cls(**values)  # type: ignore[return-value]

    def to_env(self) -> dict[str, str]:
        """The function's environment that parses back to these settings: every setting with a value, except
        those of the other kind of endpoint (a serverless endpoint has no instance type)."""
        kind = "serverless" if self.serverless else "instances"
        environment = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None or value in ("", ()) or setting.only_for not in (None, kind):
                continue
            environment[setting.env] = setting.format(value)
        return environment

    @property
    def serverless(self) -> bool:
        return self.serverless_memory_mb is not None  # type: ignore[attr-defined]

    @property
    def autoscaling(self) -> bool:
        return self.min_capacity is not None and self.max_capacity is not None  # type: ignore[attr-defined]

    @property
    def base_name(self) -> str:
        return resource_base_name(self.resource_name_prefix, self.model_package_group)  # type: ignore[attr-defined]

    @property
    def resolved_endpoint_name(self) -> str:
        return self.endpoint_name or self.base_name  # type: ignore[attr-defined]


def _settings_fields() -> list[tuple[str, Any, Any]]:
    fields = []
    for setting in SETTINGS:
        annotation = _TYPES[setting.kind]
        if setting.default is None and not setting.required:
            annotation = annotation | None
        fields.append(
            (setting.name, annotation)
            if setting.required
            else (setting.name, annotation, dataclasses.field(default=setting.default))
        )
    return fields


# Everything the deployment reads from the function's environment, parsed and checked: one field per row of
# SETTINGS, made from the table so that a setting is written down once.
DeploySettings = dataclasses.make_dataclass(
    "DeploySettings", _settings_fields(), bases=(_DeploySettingsMethods,), frozen=True
)
DeploySettings.__module__ = __name__  # make_dataclass names its own module before Python 3.12
DeploySettings.__doc__ = "The deploy settings: one field per row of :data:`SETTINGS` (see there)."


# --- names ----------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    """Lower-case letters, digits and single hyphens: valid in every SageMaker name and the same in its ARN."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def resource_base_name(prefix: str, model_package_group: str) -> str:
    """``<prefix>-<group>`` as a valid name short enough for the version suffixes; long groups get a hash tail."""
    base = _slug(f"{prefix}-{model_package_group}")
    limit = MAX_NAME_LENGTH - _SUFFIX_ROOM
    if len(base) > limit:
        digest = hashlib.sha256(base.encode()).hexdigest()[:6]
        base = f"{base[: limit - 7].rstrip('-')}-{digest}"
    return base


def model_name_for(settings: DeploySettings, version: int) -> str:
    return f"{settings.base_name}-v{version}"


def endpoint_config_name_for(settings: DeploySettings, version: int, config_request: Mapping[str, Any]) -> str:
    """Stable per version *and* per config content: the same event reuses it, changed settings get a new one."""
    content = {key: value for key, value in config_request.items() if key not in ("EndpointConfigName", "Tags")}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings.base_name}-v{version}-{digest}"


# --- requests -------------------------------------------------------------------------------------------------


def production_variant(settings: DeploySettings, model_name: str) -> dict[str, Any]:
    variant: dict[str, Any] = {"VariantName": VARIANT_NAME, "ModelName": model_name, "InitialVariantWeight": 1.0}
    if settings.serverless:
        variant["ServerlessConfig"] = {
            "MemorySizeInMB": settings.serverless_memory_mb,
            "MaxConcurrency": settings.serverless_max_concurrency,
        }
    else:
        variant["InstanceType"] = settings.endpoint_instance_type
        variant["InitialInstanceCount"] = settings.endpoint_instance_count
    return variant


def data_capture_config(settings: DeploySettings) -> dict[str, Any] | None:
    if not settings.data_capture_s3_uri:
        return None
    return {
        "EnableCapture": True,
        "InitialSamplingPercentage": settings.data_capture_percent,
        "DestinationS3Uri": settings.data_capture_s3_uri,
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        # JSON requests and responses are stored as text; images are stored base64-encoded.
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
    }


def endpoint_config_request(settings: DeploySettings, model_name: str) -> dict[str, Any]:
    request: dict[str, Any] = {"ProductionVariants": [production_variant(settings, model_name)]}
    capture = data_capture_config(settings)
    if capture is not None:
        request["DataCaptureConfig"] = capture
    return request


def deployment_config(settings: DeploySettings) -> dict[str, Any]:
    """UpdateEndpoint's DeploymentConfig: blue/green always, traffic shifting and rollback alarms when set."""
    wait = settings.traffic_wait_seconds
    if wait is None:  # baking only makes sense while alarms watch it
        wait = DEFAULT_BAKING_SECONDS_WITH_ALARMS if settings.rollback_alarm_names else 0
    routing: dict[str, Any] = {"Type": settings.traffic_routing, "WaitIntervalInSeconds": wait}
    if settings.traffic_routing == "CANARY":
        routing["CanarySize"] = {"Type": "CAPACITY_PERCENT", "Value": settings.traffic_step_percent}
    elif settings.traffic_routing == "LINEAR":
        routing["LinearStepSize"] = {"Type": "CAPACITY_PERCENT", "Value": settings.traffic_step_percent}
    policy: dict[str, Any] = {
        "TrafficRoutingConfiguration": routing,
        "TerminationWaitInSeconds": settings.termination_wait_seconds,
    }
    if settings.max_execution_timeout_seconds is not None:
        policy["MaximumExecutionTimeoutInSeconds"] = settings.max_execution_timeout_seconds
    config: dict[str, Any] = {"BlueGreenUpdatePolicy": policy}
    if settings.rollback_alarm_names:
        config["AutoRollbackConfiguration"] = {
            "Alarms": [{"AlarmName": name} for name in settings.rollback_alarm_names]
        }
    return config


# --- AWS helpers ----------------------------------------------------------------------------------------------


@dataclass
class DeployClients:
    """The boto3 clients the deployment uses (application-autoscaling only when autoscaling is on)."""

    sagemaker: Any
    autoscaling: Any = None


def create_clients(region_name: str | None = None, session: Any = None) -> DeployClients:
    import boto3  # in the Lambda runtime; imported here so the module loads (and tests collect) without AWS

    if session is None and region_name is None:
        session = boto3  # the default session: in Lambda, the function's role and region
    elif session is None:
        session = boto3.session.Session(region_name=region_name)
    return DeployClients(sagemaker=session.client("sagemaker"), autoscaling=session.client("application-autoscaling"))


def _error_code(error: ClientError) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _error_message(error: ClientError) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Message", ""))


def _is_not_found(error: ClientError) -> bool:
    # SageMaker answers Describe* of a missing resource with ValidationException "Could not find ...".
    message = _error_message(error).lower()
    return _error_code(error) in ("ValidationException", "ResourceNotFound") and (
        "could not find" in message or "not found" in message or "does not exist" in message
    )


def _is_already_exists(error: ClientError) -> bool:
    # A concurrent invocation created it between our Describe and Create.
    message = _error_message(error).lower()
    return _error_code(error) in ("ValidationException", "ResourceInUse") and (
        "already exist" in message or "already in use" in message
    )


def _describe_or_none(describe: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any] | None:
    try:
        return describe(**kwargs)
    except ClientError as error:
        if _is_not_found(error):
            return None
        raise


def _log(level: int, message: str, **fields: Any) -> None:
    """One line per fact: ``message key=value ...`` so CloudWatch Logs Insights can parse it."""
    rendered = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in fields.items())
    logger.log(level, "%s %s", message, rendered)


def _tags(model_package_arn: str) -> list[dict[str, str]]:
    return [
        {"Key": "model-package-arn", "Value": model_package_arn[:256]},
        {"Key": "deployed-by", "Value": "deploy-on-approval"},
    ]


# --- the deployment -------------------------------------------------------------------------------------------


def _ensure_model(clients: DeployClients, settings: DeploySettings, model_name: str, package_arn: str) -> bool:
    """Create the Model from the package unless it exists; True when this call created it."""
    if _describe_or_none(clients.sagemaker.describe_model, ModelName=model_name) is not None:
        _log(logging.INFO, "model exists", model_name=model_name)
        return False
    try:
        clients.sagemaker.create_model(
            ModelName=model_name,
            ExecutionRoleArn=settings.execution_role_arn,
            PrimaryContainer={"ModelPackageName": package_arn},
            Tags=_tags(package_arn),
        )
    except ClientError as error:
        if not _is_already_exists(error):
            raise
        _log(logging.INFO, "model created concurrently", model_name=model_name)
        return False
    _log(logging.INFO, "model created", model_name=model_name, model_package_arn=package_arn)
    return True


def _ensure_endpoint_config(
    clients: DeployClients, config_name: str, request: Mapping[str, Any], package_arn: str
) -> bool:
    """Create the endpoint config unless it exists (configs are immutable: an existing one is never changed)."""
    if _describe_or_none(clients.sagemaker.describe_endpoint_config, EndpointConfigName=config_name) is not None:
        _log(logging.INFO, "endpoint config exists", endpoint_config_name=config_name)
        return False
    try:
        clients.sagemaker.create_endpoint_config(EndpointConfigName=config_name, Tags=_tags(package_arn), **request)
    except ClientError as error:
        if not _is_already_exists(error):
            raise
        _log(logging.INFO, "endpoint config created concurrently", endpoint_config_name=config_name)
        return False
    _log(logging.INFO, "endpoint config created", endpoint_config_name=config_name)
    return True


def _pending_config_name(endpoint: Mapping[str, Any]) -> str | None:
    return (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")


def _wait_while_busy(
    clients: DeployClients,
    settings: DeploySettings,
    endpoint_name: str,
    deadline: float,
    sleep: Callable[[float], None],
    target_config: str,
) -> dict[str, Any] | None:
    """Describe the endpoint, polling while it is busy and time is left; None when it does not exist."""
    while True:
        endpoint = _describe_or_none(clients.sagemaker.describe_endpoint, EndpointName=endpoint_name)
        if endpoint is None:
            return None
        status = endpoint.get("EndpointStatus", "")
        already_ours = target_config in (endpoint.get("EndpointConfigName"), _pending_config_name(endpoint))
        if status not in BUSY_STATUSES or already_ours:
            return endpoint
        remaining = deadline - time.monotonic()
        if remaining < settings.endpoint_poll_seconds:
            raise EndpointBusyError(
                f"endpoint {endpoint_name} is {status} (another deployment or a scaling activity is in progress); "
                f"it cannot take endpoint config {target_config} now. The invocation fails so that it is retried "
                "(Lambda retries asynchronous invocations); to deploy by hand later run "
                "`python -m pipelines.run deploy --model-package-arn <arn>`."
            )
        _log(logging.INFO, "endpoint busy, waiting", endpoint_name=endpoint_name, status=status)
        sleep(settings.endpoint_poll_seconds)


def _wait_until_in_service(
    clients: DeployClients,
    settings: DeploySettings,
    endpoint_name: str,
    deadline: float,
    sleep: Callable[[float], None],
) -> None:
    """Autoscaling can be registered only on an InService endpoint."""
    while True:
        endpoint = clients.sagemaker.describe_endpoint(EndpointName=endpoint_name)
        status = endpoint.get("EndpointStatus", "")
        if status == "InService":
            return
        if status == "Failed":
            raise EndpointFailedError(_failed_message(endpoint_name, endpoint))
        if deadline - time.monotonic() < settings.endpoint_poll_seconds:
            raise EndpointBusyError(
                f"endpoint {endpoint_name} is {status}: the deployment is under way, but autoscaling can be "
                "registered only once it is InService. The invocation fails so that it is retried; the retry "
                "finds the deployment done and only registers autoscaling."
            )
        _log(logging.INFO, "waiting for InService before autoscaling", endpoint_name=endpoint_name, status=status)
        sleep(settings.endpoint_poll_seconds)


def _in_service(clients: DeployClients, endpoint_name: str) -> bool:
    return clients.sagemaker.describe_endpoint(EndpointName=endpoint_name).get("EndpointStatus") == "InService"


def _failed_message(endpoint_name: str, endpoint: Mapping[str, Any]) -> str:
    return (
        f"endpoint {endpoint_name} is Failed ({endpoint.get('FailureReason', 'no reason given')}); SageMaker allows "
        f"only deleting a failed endpoint. Delete it (aws sagemaker delete-endpoint --endpoint-name {endpoint_name}) "
        "and deploy again (python -m pipelines.run deploy --model-package-arn <arn>)."
    )


def _ensure_autoscaling(clients: DeployClients, settings: DeploySettings, endpoint_name: str) -> dict[str, Any]:
    """Register the variant as a scalable target and put the target-tracking policy (both are upserts)."""
    resource_id = f"endpoint/{endpoint_name}/variant/{VARIANT_NAME}"
    policy_name = f"{endpoint_name}-invocations-per-instance"
    clients.autoscaling.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=settings.min_capacity,
        MaxCapacity=settings.max_capacity,
    )
    clients.autoscaling.put_scaling_policy(
        PolicyName=policy_name,
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": settings.target_invocations_per_instance,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": settings.scale_in_cooldown_seconds,
            "ScaleOutCooldown": settings.scale_out_cooldown_seconds,
        },
    )
    result = {
        "resource_id": resource_id,
        "policy_name": policy_name,
        "min_capacity": settings.min_capacity,
        "max_capacity": settings.max_capacity,
        "target_invocations_per_instance": settings.target_invocations_per_instance,
    }
    _log(logging.INFO, "autoscaling registered", **result)
    return result


def deploy_model_package(
    model_package_arn: str,
    settings: DeploySettings,
    clients: DeployClients,
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] | None = None,
    wait_for_in_service: bool = True,
) -> dict[str, Any]:
    """Deploy one model package if it is an Approved package of the configured group; return what was done.

    ``deadline`` (a ``time.monotonic()`` value) bounds every wait; the default is ``settings.endpoint_wait_seconds``
    from now. Without ``wait_for_in_service`` autoscaling is registered only if the endpoint is InService already.
    Any AWS error is logged with the package ARN and re-raised.
    """
    if deadline is None:
        deadline = time.monotonic() + settings.endpoint_wait_seconds
    try:
        return _deploy(model_package_arn, settings, clients, deadline, sleep or time.sleep, wait_for_in_service)
    except ClientError as error:
        _log(
            logging.ERROR,
            "AWS call failed",
            model_package_arn=model_package_arn,
            operation=getattr(error, "operation_name", "?"),
            code=_error_code(error),
            error=_error_message(error),
        )
        raise
    except DeployError as error:
        _log(logging.ERROR, "deployment not done", model_package_arn=model_package_arn, error=str(error))
        raise


def _ignored(reason: str, **fields: Any) -> dict[str, Any]:
    _log(logging.INFO, "ignored", reason=reason, **fields)
    return {"action": "ignored", "reason": reason, **fields}


def _deploy(
    package_arn: str,
    settings: DeploySettings,
    clients: DeployClients,
    deadline: float,
    sleep: Callable[[float], None],
    wait_for_in_service: bool = True,
) -> dict[str, Any]:
    package = clients.sagemaker.describe_model_package(ModelPackageName=package_arn)
    group = package.get("ModelPackageGroupName")
    status = package.get("ModelApprovalStatus")
    version = package.get("ModelPackageVersion")
    if group != settings.model_package_group:
        return _ignored(
            f"package belongs to group {group!r}, not {settings.model_package_group!r}",
            model_package_arn=package_arn,
        )
    tag_mlflow_run(package)  # the run learns its version and status, whatever the deployment does next
    if status != APPROVED:
        # The event said Approved, but someone changed it since: deploy only what is approved now.
        return _ignored(
            f"package is {status}, not Approved", model_package_arn=package_arn, model_approval_status=status
        )
    if not isinstance(version, int):
        return _ignored("package has no version (not a versioned package of a group)", model_package_arn=package_arn)

    model_name = model_name_for(settings, version)
    config_request = endpoint_config_request(settings, model_name)
    apply_serving_image(config_request, serving_image_of(package), settings)
    config_name = endpoint_config_name_for(settings, version, config_request)
    endpoint_name = settings.resolved_endpoint_name
    names = {
        "model_package_arn": package_arn,
        "model_package_version": version,
        "model_name": model_name,
        "endpoint_config_name": config_name,
        "endpoint_name": endpoint_name,
    }
    _log(logging.INFO, "deploying", **names)

    model_created = _ensure_model(clients, settings, model_name, package_arn)
    config_created = _ensure_endpoint_config(clients, config_name, config_request, package_arn)
    result: dict[str, Any] = {**names, "model_created": model_created, "endpoint_config_created": config_created}

    endpoint = _wait_while_busy(clients, settings, endpoint_name, deadline, sleep, config_name)
    if endpoint is None:
        try:
            clients.sagemaker.create_endpoint(
                EndpointName=endpoint_name, EndpointConfigName=config_name, Tags=_tags(package_arn)
            )
            result["action"] = "created"
            _log(logging.INFO, "endpoint created", endpoint_name=endpoint_name, endpoint_config_name=config_name)
        except ClientError as error:
            if not _is_already_exists(error):
                raise
            endpoint = _wait_while_busy(clients, settings, endpoint_name, deadline, sleep, config_name)
            if endpoint is None:  # created and deleted again in between: let the retry sort it out
                raise EndpointBusyError(f"endpoint {endpoint_name} appeared and disappeared; retry") from error
    if endpoint is not None:
        result.update(_update_endpoint(clients, settings, endpoint, endpoint_name, config_name))

    result["autoscaling"] = None
    if settings.autoscaling and wait_for_in_service:
        _wait_until_in_service(clients, settings, endpoint_name, deadline, sleep)
    if settings.autoscaling and (wait_for_in_service or _in_service(clients, endpoint_name)):
        result["autoscaling"] = _ensure_autoscaling(clients, settings, endpoint_name)
    elif settings.autoscaling:
        result["autoscaling"] = "pending: registered by the next deployment once the endpoint is InService"
    _log(logging.INFO, "done", action=result["action"], endpoint_name=endpoint_name, endpoint_config_name=config_name)
    return result


def _update_endpoint(
    clients: DeployClients,
    settings: DeploySettings,
    endpoint: Mapping[str, Any],
    endpoint_name: str,
    config_name: str,
) -> dict[str, Any]:
    current = endpoint.get("EndpointConfigName")
    status = endpoint.get("EndpointStatus", "")
    if config_name in (current, _pending_config_name(endpoint)):
        _log(logging.INFO, "endpoint already on this config", endpoint_name=endpoint_name, status=status)
        return {"action": "unchanged", "endpoint_status": status}
    if status == "Failed":
        raise EndpointFailedError(_failed_message(endpoint_name, endpoint))
    if status not in UPDATABLE_STATUSES:  # _wait_while_busy raised for the busy ones; anything new lands here
        raise EndpointBusyError(f"endpoint {endpoint_name} is {status}; it cannot be updated now, retry later")
    deployment = deployment_config(settings)
    clients.sagemaker.update_endpoint(
        EndpointName=endpoint_name,
        EndpointConfigName=config_name,
        RetainAllVariantProperties=False,
        DeploymentConfig=deployment,
    )
    _log(
        logging.INFO,
        "endpoint update started",
        endpoint_name=endpoint_name,
        previous_endpoint_config_name=current,
        endpoint_config_name=config_name,
        deployment_config=deployment,
    )
    return {"action": "updated", "previous_endpoint_config_name": current, "deployment_config": deployment}


# --- the MLflow run of the package ----------------------------------------------------------------------------
#
# A package registered with tracking names its MLflow run in CustomerMetadataProperties (the Register step writes
# them; entrypoints/tracking.py owns the keys, copied here because this file is zipped alone). The function tags
# that run and its parent with the package's ARN, version and approval status, so that on SageMaker, too, the run
# leads to its version. It speaks MLflow's REST API over urllib (no mlflow in the function) and reaches a
# SageMaker MLflow ARN the way the sagemaker-mlflow plugin does (its host metadata provider, header provider and
# auth provider): the region's MLflow endpoint, a header that names the ARN, and SigV4 for the plugin's signing
# name. A plain http(s) URI is called unsigned; any other URI (sqlite:, file:) is the local runner's to tag.
# Tagging is best effort: a failure is one log line and the deployment goes on (the registry is the record).

MLFLOW_RUN_ID_KEY = "mlflow-run-id"
MLFLOW_TRACKING_URI_KEY = "mlflow-tracking-uri"
MLFLOW_NOT_TRACKED = "not-tracked"  # the run ID a package gets when its Evaluate job did not track
MLFLOW_PARENT_TAG = "mlflow.parentRunId"
MLFLOW_TIMEOUT_SECONDS = 5.0  # per request; the first failure ends the tagging, so a dead server costs one wait
# The plugin's own override of the endpoint (a VPC endpoint, a proxy), honoured the same way.
MLFLOW_ENDPOINT_VARIABLE = "SAGEMAKER_MLFLOW_CUSTOM_ENDPOINT"
MLFLOW_ARN_PATTERN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):sagemaker:(?P<region>[a-z0-9-]+):\d{12}:"
    r"(?P<kind>mlflow-tracking-server|mlflow-app)/[a-zA-Z0-9-]+"
)
# Per ARN kind, as sagemaker-mlflow 0.5.0 does it: (endpoint, routing header, SigV4 signing name).
MLFLOW_ARN_KINDS = {
    "mlflow-tracking-server": (
        "https://{region}.experiments.sagemaker.aws",
        "x-mlflow-sm-tracking-server-arn",
        "sagemaker-mlflow",
    ),
    "mlflow-app": ("https://mlflow.sagemaker.{region}.app.aws", "x-sm-mlflow-app-arn", "sagemaker"),
}
MLFLOW_PARTITIONS = ("aws", "aws-us-gov")  # the partitions the plugin has an endpoint for


@dataclass(frozen=True)
class MlflowServer:
    """Where a tracking URI's REST API answers: its base URL, the headers every request carries, and the SigV4
    signing name and region (None: unsigned)."""

    url: str
    headers: Mapping[str, str]
    signing_name: str | None = None
    region: str | None = None


def mlflow_server(uri: str, environ: Mapping[str, str] | None = None) -> MlflowServer | None:
    """The server of a tracking URI; None for a URI the function leaves alone. Raises ValueError for an ARN that is
    no SageMaker MLflow tracking server or app ARN."""
    if uri.startswith(("http://", "https://")):
        return MlflowServer(uri.rstrip("/"), {})
    if not uri.startswith("arn:"):
        return None
    match = MLFLOW_ARN_PATTERN.fullmatch(uri)
    if match is None or match["partition"] not in MLFLOW_PARTITIONS:
        raise ValueError(f"{uri} is not a SageMaker MLflow tracking server or app ARN in {'/'.join(MLFLOW_PARTITIONS)}")
    endpoint, header, signing_name = MLFLOW_ARN_KINDS[match["kind"]]
    override = (os.environ if environ is None else environ).get(MLFLOW_ENDPOINT_VARIABLE, "").strip()
    url = override or endpoint.format(region=match["region"])
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{MLFLOW_ENDPOINT_VARIABLE}={override!r} is not an http(s) URL")
    return MlflowServer(url.rstrip("/"), {header: uri}, signing_name, match["region"])


def _mlflow_request(server: MlflowServer, method: str, path: str, body: Any, credentials: Any) -> dict[str, Any]:
    """One call of MLflow's REST API (``/api/2.0/mlflow/<path>``), signed when the server needs it."""
    import urllib.parse
    import urllib.request

    url = f"{server.url}/api/2.0/mlflow/{path}"
    data = None
    headers = dict(server.headers)
    if method == "GET":
        url += "?" + urllib.parse.urlencode(body)
    else:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if server.signing_name is not None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        headers["X-Amz-Content-SHA256"] = hashlib.sha256(data or b"").hexdigest()
        signed = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(credentials, server.signing_name, server.region).add_auth(signed)
        headers = dict(signed.headers.items())
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - http(s) only
    with urllib.request.urlopen(request, timeout=MLFLOW_TIMEOUT_SECONDS) as response:  # noqa: S310
        return json.loads(response.read() or b"{}")


def _aws_credentials() -> Any:
    import boto3  # in the Lambda runtime: the function's role

    credentials = boto3.session.Session().get_credentials()
    if credentials is None:
        raise ValueError("no AWS credentials to sign the MLflow requests with")
    return credentials.get_frozen_credentials()


def mlflow_run_tags(package: Mapping[str, Any]) -> dict[str, str]:
    """The tags that lead a run to its model package (the same as the local runner's)."""
    tags = {
        "model_package.arn": package.get("ModelPackageArn"),
        "model_package.version": package.get("ModelPackageVersion"),
        "model_package.status": package.get("ModelApprovalStatus"),
    }
    return {key: str(value) for key, value in tags.items() if value is not None}


def tag_mlflow_run(package: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> str | None:
    """Tag the run the package names, and its parent, with :func:`mlflow_run_tags`. Returns the run ID tagged, or
    None when the package names no run, its URI is left to the local runner, or tagging fails (one log line)."""
    metadata = package.get("CustomerMetadataProperties") or {}
    run_id, uri = metadata.get(MLFLOW_RUN_ID_KEY), str(metadata.get(MLFLOW_TRACKING_URI_KEY) or "")
    if not run_id or run_id == MLFLOW_NOT_TRACKED or not uri:
        return None
    try:
        server = mlflow_server(uri, environ)
        if server is None:
            return None
        credentials = _aws_credentials() if server.signing_name is not None else None
        run = _mlflow_request(server, "GET", "runs/get", {"run_id": run_id}, credentials)
        tags = {tag.get("key"): tag.get("value") for tag in run.get("run", {}).get("data", {}).get("tags", [])}
        parent = tags.get(MLFLOW_PARENT_TAG)
        for target in filter(None, (run_id, parent)):
            for key, value in mlflow_run_tags(package).items():
                body = {"run_id": target, "key": key, "value": value}
                _mlflow_request(server, "POST", "runs/set-tag", body, credentials)
    except Exception as error:  # the registry is the system of record: never fail the deployment for this
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0][:300] if text else ''}"
        _log(logging.WARNING, "mlflow run not tagged", run_id=run_id, tracking_uri=uri, error=reason)
        return None
    _log(logging.INFO, "mlflow run tagged", run_id=run_id, parent_run_id=parent, **mlflow_run_tags(package))
    return str(run_id)


# --- the serving image ----------------------------------------------------------------------------------------
#
# Packages registered by the pipeline run on AWS's Ray Serve inference image (ray:serve-ml-sagemaker-cpu|cuda) by
# default, or on the legacy SageMaker PyTorch 2.6 image. The Ray Serve image is untested by AWS on serverless
# endpoints and is not made for multi-model endpoints: a serverless deployment of such a package is refused with
# the reason (falling back to the unpatched legacy image silently, in an unattended function, would trade a clear
# failure for an endpoint without security fixes). Its CUDA build needs a GPU instance and a host AMI whose NVIDIA
# drivers match it; the legacy image is deployed with a warning that it is past end of patches.

RAY_SERVE_IMAGE_MARKER = "/ray:serve-ml-sagemaker-"
LEGACY_IMAGE_MARKER = "/pytorch-inference:"
RAY_SERVE_GPU_AMI_VERSION = "al2-ami-sagemaker-inference-gpu-3-1"
LEGACY_END_OF_PATCHES = "2026-06-30"


class UnsupportedServingImageError(DeployError):
    """The package's serving image cannot serve with these settings; the message says why and what to do."""


def serving_image_of(package: Mapping[str, Any]) -> str:
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or [{}]
    return str(containers[0].get("Image", ""))


def _is_gpu_instance(instance_type: str) -> bool:
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
    return family[:1] in ("g", "p")  # ml.g4dn, ml.g5, ml.gr6, ml.p4d...: NVIDIA GPUs


def apply_serving_image(config_request: dict[str, Any], image: str, settings: DeploySettings) -> None:
    """Refuse what the package's image cannot serve; give the Ray Serve CUDA image its host AMI."""
    if RAY_SERVE_IMAGE_MARKER in image:
        if settings.serverless:
            raise UnsupportedServingImageError(
                f"the package runs on the Ray Serve image ({image}), which AWS does not support on serverless "
                "endpoints: unset SERVERLESS_MEMORY_MB to serve from instances, or register the model with "
                "--serving-image pytorch-2.6 (past end of patches) to serve it serverless"
            )
        cuda = "-cuda-" in image
        if cuda != _is_gpu_instance(settings.endpoint_instance_type):
            instance_type = f"{SETTINGS_BY_NAME['endpoint_instance_type'].env}={settings.endpoint_instance_type}"
            raise UnsupportedServingImageError(
                f"the package's image is the Ray Serve {'CUDA' if cuda else 'CPU'} build but {instance_type} is a "
                f"{'CPU' if cuda else 'GPU'} instance: choose a matching instance type, or register the model with "
                "--serving-instance-type of the same kind"
            )
        if cuda:
            for variant in config_request["ProductionVariants"]:
                variant["InferenceAmiVersion"] = RAY_SERVE_GPU_AMI_VERSION
    elif LEGACY_IMAGE_MARKER in image:
        _log(
            logging.WARNING,
            "legacy serving image: past end of patches",
            image=image,
            end_of_patches=LEGACY_END_OF_PATCHES,
        )


# --- the event ------------------------------------------------------------------------------------------------


def parse_event(event: Any, settings: DeploySettings, status: str | None = APPROVED) -> tuple[str | None, str | None]:
    """(model package ARN, None) for a change of a package of the configured group to ``status`` (an approval; None:
    any status), else (None, why it is ignored)."""
    if not isinstance(event, Mapping):
        return None, f"event is a {type(event).__name__}, not an EventBridge event object"
    if event.get("source") != EVENT_SOURCE or event.get("detail-type") != EVENT_DETAIL_TYPE:
        return None, f"not a model package state change (source={event.get('source')!r}, " + (
            f"detail-type={event.get('detail-type')!r})"
        )
    detail = event.get("detail")
    if not isinstance(detail, Mapping):
        return None, "event has no detail object"
    changed_to = detail.get("ModelApprovalStatus")
    group = detail.get("ModelPackageGroupName")
    if status is not None and changed_to != status:
        return None, f"approval status is {changed_to!r}, not {status!r}"
    if group != settings.model_package_group:
        return None, f"model package group is {group!r}, not {settings.model_package_group!r}"
    arn = detail.get("ModelPackageArn") or (event.get("resources") or [None])[0]
    if not isinstance(arn, str) or ":model-package/" not in arn:
        return None, "event names no model package ARN (detail.ModelPackageArn)"
    return arn, None


def handle_event(
    event: Any,
    settings: DeploySettings,
    clients: DeployClients,
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Filter the event, then deploy its package; see :func:`deploy_model_package`."""
    arn, reason = parse_event(event, settings)
    if arn is None:
        detail = event.get("detail") if isinstance(event, Mapping) else None
        arn_in_event = detail.get("ModelPackageArn") if isinstance(detail, Mapping) else None
        changed, _ = parse_event(event, settings, status=None)
        if changed is not None:  # a rejection, say: nothing to deploy, but the package's MLflow run learns it
            _tag_status_change(changed, clients)
        return _ignored(reason or "ignored", model_package_arn=arn_in_event, event_id=_event_id(event))
    return deploy_model_package(arn, settings, clients, deadline=deadline, sleep=sleep)


def _tag_status_change(arn: str, clients: DeployClients) -> None:
    """A package of the group changed to a status other than Approved: its MLflow run learns the new status. Only
    a tracked pipeline's rule sends such events here."""
    try:
        package = clients.sagemaker.describe_model_package(ModelPackageName=arn)
    except ClientError as error:
        _log(logging.WARNING, "mlflow run not tagged", model_package_arn=arn, error=_error_message(error))
        return
    tag_mlflow_run(package)


def _event_id(event: Any) -> Any:
    return event.get("id") if isinstance(event, Mapping) else None


def is_pipeline_payload(event: Any) -> bool:
    """The Deploy LambdaStep's input (``{"model_package_arn": ...}``), not an EventBridge event."""
    return isinstance(event, Mapping) and PIPELINE_PAYLOAD_KEY in event and "detail-type" not in event


def handle_pipeline_step(
    payload: Mapping[str, Any],
    settings: DeploySettings,
    clients: DeployClients,
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """The Deploy step: deploy the new package if it is Approved, else say it awaits approval; never wait for
    InService. The result always holds ``action``, ``endpoint_name`` and ``model_package_arn``."""
    arn = payload.get(PIPELINE_PAYLOAD_KEY)
    if not isinstance(arn, str) or ":model-package/" not in arn:
        raise DeployError(
            f"the pipeline passed {PIPELINE_PAYLOAD_KEY}={arn!r}, which is not a model package ARN: the Deploy "
            "step's input must be the Register step's ModelPackageArn"
        )
    result = deploy_model_package(arn, settings, clients, deadline=deadline, sleep=sleep, wait_for_in_service=False)
    if result["action"] == "ignored" and result.get("model_approval_status") == PENDING_APPROVAL:
        result["action"] = AWAITING_APPROVAL  # approving it later deploys it through the EventBridge rule
    result.setdefault("endpoint_name", settings.resolved_endpoint_name)
    result["model_package_arn"] = arn
    return result


def invoke(
    event: Any,
    settings: DeploySettings,
    clients: DeployClients,
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """One invocation of the function: the Deploy step's payload or an EventBridge event."""
    if is_pipeline_payload(event):
        return handle_pipeline_step(event, settings, clients, deadline=deadline, sleep=sleep)
    return handle_event(event, settings, clients, deadline=deadline, sleep=sleep)


def _deadline_from_context(context: Any, settings: DeploySettings, limit_seconds: float | None = None) -> float:
    """Wait no longer than ENDPOINT_WAIT_SECONDS (and ``limit_seconds``), and stop a minute before Lambda's own
    timeout."""
    wait = float(settings.endpoint_wait_seconds)
    if limit_seconds is not None:
        wait = min(wait, limit_seconds)
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining_ms):
        wait = min(wait, max(0.0, remaining_ms() / 1000.0 - 60.0))
    return time.monotonic() + wait


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point (``deploy.handler``)."""
    settings = DeploySettings.from_env()
    logger.setLevel(settings.log_level)
    _log(logging.INFO, "event received", event_id=_event_id(event), settings=asdict(settings))
    limit = PIPELINE_STEP_WAIT_SECONDS if is_pipeline_payload(event) else None
    deadline = _deadline_from_context(context, settings, limit)
    return invoke(event, settings, create_clients(), deadline=deadline)
