"""``python -m pipelines.run endpoint-test``: smoke-test a served endpoint against the artifact's own answers.

    python -m pipelines.run endpoint-test --test-dir DIR [--images 20]                     # the local endpoint
    python -m pipelines.run endpoint-test --test-dir DIR --endpoint http://127.0.0.1:8080 --model model.tar.gz
    python -m pipelines.run endpoint-test --test-dir s3://bucket/prefix/test --endpoint-name NAME --region R

It sends ``--images`` images of the test split (``<class>/<image>`` folders, taken in turn from each class) one
request each, and compares every answer's top-1 class with what the served artifact's own handlers answer
offline for the same bytes (``code/inference.py`` of the model the endpoint serves, run in this process). A
top-1 class that differs counts as a mismatch, unless the offline probabilities of the two classes are within
``TIE_TOLERANCE`` (a tie that another runtime may break the other way). It reports latency p50/p95 and exits 1 on
any mismatch or any failed request (5xx, or a refusal of an image the artifact accepts offline).

``--rollback`` (local endpoints) serves the newest earlier Approved version again when the test fails, and marks
the tested version Rejected; ``python -m pipelines.run deploy --smoke-test-dir`` does the same on SageMaker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from entrypoints import contract
from pipelines import config
from pipelines.cli import backend
from pipelines.definition import names
from pipelines.serving.predict import content_type_of
from pipelines.util import fsutil, urls
from pipelines.util.errors import CommandError

TIE_TOLERANCE = 1e-3
DEFAULT_IMAGES = 20
TIMEOUT_S = 60.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

Invoke = Callable[[bytes, str], tuple[int, bytes]]  # (body, content type) -> (HTTP status, response body)


class SmokeTestError(Exception):
    """The test could not run (no images, no model, endpoint out of reach): the message says what to do."""


@dataclass
class Check:
    """One image: what the endpoint answered and what the artifact answers offline."""

    image: str
    status: int
    served: str | None
    expected: str | None
    latency_ms: float
    problem: str | None = None


@dataclass
class SmokeReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.problem]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failures

    def latency(self, quantile: float) -> float:
        values = sorted(check.latency_ms for check in self.checks if check.status == 200)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(quantile * (len(values) - 1)))]

    def summary(self) -> str:
        errors = sum(1 for check in self.failures if check.status != 200)
        return (
            f"endpoint-test: {len(self.checks)} images, {len(self.failures) - errors} mismatches, {errors} failed "
            f"requests; latency p50 {self.latency(0.5):.1f} ms p95 {self.latency(0.95):.1f} ms: "
            f"{'passed' if self.ok else 'FAILED'}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "p50_ms": self.latency(0.5),
            "p95_ms": self.latency(0.95),
            "checks": [asdict(check) for check in self.checks],
        }


# --- the test images -------------------------------------------------------------------------------------------------


def pick_images(paths: Sequence[str], count: int) -> list[str]:
    """``count`` images taken in turn from each class folder (the parent folder name), in a stable order."""
    by_class: dict[str, list[str]] = {}
    for path in sorted(paths):
        if path.lower().endswith(IMAGE_SUFFIXES):
            by_class.setdefault(path.replace("\\", "/").rsplit("/", 2)[-2], []).append(path)
    chosen: list[str] = []
    queues = [list(images) for _, images in sorted(by_class.items())]
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def local_test_images(test_dir: Path, count: int) -> list[tuple[str, bytes]]:
    if not test_dir.is_dir():
        raise SmokeTestError(f"--test-dir {test_dir} is not a folder of <class>/<image> files")
    paths = [str(path) for path in test_dir.glob("*/*") if path.is_file()]
    return [(path, Path(path).read_bytes()) for path in pick_images(paths, count)]


def s3_test_images(uri: str, count: int, session: Any) -> list[tuple[str, bytes]]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = session.client("s3")
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return [
        (f"s3://{bucket}/{key}", s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for key in pick_images(keys, count)
    ]


# --- answers ---------------------------------------------------------------------------------------------------------


def offline_answers(model_dir: Path, images: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The artifact's own answer per image: ``{"top_k": [...]}``, or ``{"status": 4xx}`` for a refusal."""
    from steps import evaluate

    answers = []
    with evaluate.serving_code(model_dir) as inference:
        model = inference.model_fn(str(model_dir))
        for _, data in images:
            try:
                batch = inference.input_fn(data, content_type_of(data))
                body, _ = inference.output_fn(inference.predict_fn(batch, model), contract.JSON_CONTENT_TYPE)
            except inference.InferenceError as error:
                answers.append({"status": error.status_code})
                continue
            answers.append(json.loads(body)["predictions"][0])
    return answers


def _top1(answer: dict[str, Any]) -> str | None:
    top = answer.get("top_k") or []
    return str(top[0]["class"]) if top else None


def compare(status: int, body: bytes, expected: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the served top-1 class, the problem or None) for one answer against the artifact's offline answer."""
    if "status" in expected:  # the artifact refuses this file offline: the endpoint must refuse it too
        return None, None if 400 <= status < 500 else f"expected a {expected['status']} refusal, got {status}"
    if status != 200:
        return None, f"status {status}: {body[:200].decode('utf-8', errors='replace')}"
    try:
        served = json.loads(body)["predictions"][0]
        served_class = _top1(served)
    except (ValueError, KeyError, IndexError, TypeError):
        return None, f"the answer is not the endpoint contract's JSON: {body[:200]!r}"
    expected_class = _top1(expected)
    if served_class == expected_class:
        return served_class, None
    offline = {entry["class"]: entry["probability"] for entry in expected.get("top_k", [])}
    if served_class in offline and offline[expected_class] - offline[served_class] <= TIE_TOLERANCE:
        return served_class, None  # a near-tie offline: either answer is right
    return served_class, f"top-1 {served_class!r} differs from the artifact's {expected_class!r}"


def run_smoke_test(
    invoke: Invoke, images: Sequence[tuple[str, bytes]], expected: Sequence[dict[str, Any]]
) -> SmokeReport:
    report = SmokeReport()
    for (name, data), answer in zip(images, expected, strict=True):
        started = time.perf_counter()
        status, body = invoke(data, content_type_of(data))
        latency = (time.perf_counter() - started) * 1000
        served, problem = compare(status, body, answer)
        report.checks.append(Check(name, status, served, _top1(answer), latency, problem))
    return report


# --- endpoints -------------------------------------------------------------------------------------------------------


def url_invoker(url: str) -> Invoke:
    target = url.rstrip("/") + "/invocations"
    try:
        urls.check_http_url(target)
    except ValueError as error:
        raise SmokeTestError(f"--endpoint {error}") from None

    def invoke(body: bytes, content_type: str) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type, "Accept": contract.JSON_CONTENT_TYPE}
        request = urllib.request.Request(target, data=body, headers=headers, method="POST")  # noqa: S310
        try:
            with urls.urlopen(request, timeout=TIMEOUT_S) as response:  # a local URL: never through a proxy
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise SmokeTestError(f"cannot reach {target}: {getattr(error, 'reason', error)}") from error

    return invoke


def sagemaker_invoker(endpoint_name: str, session: Any) -> Invoke:
    from botocore.exceptions import ClientError

    runtime = session.client("sagemaker-runtime")

    def invoke(body: bytes, content_type: str) -> tuple[int, bytes]:
        try:
            response = runtime.invoke_endpoint(
                EndpointName=endpoint_name, ContentType=content_type, Accept=contract.JSON_CONTENT_TYPE, Body=body
            )
            return 200, response["Body"].read()
        except ClientError as error:  # ModelError carries the container's own status and body
            details = error.response
            status = details.get("OriginalStatusCode") or details.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = details.get("OriginalMessage") or details.get("Error", {}).get("Message", "")
            return int(status or 500), str(message).encode()

    return invoke


def sagemaker_model_data(endpoint_name: str, session: Any) -> str:
    """The S3 URI of the model.tar.gz the endpoint serves (through its config, model and model package)."""
    sagemaker = session.client("sagemaker")
    config_name = sagemaker.describe_endpoint(EndpointName=endpoint_name)["EndpointConfigName"]
    variant = sagemaker.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]
    container = sagemaker.describe_model(ModelName=variant["ModelName"]).get("PrimaryContainer", {})
    if container.get("ModelDataUrl"):
        return container["ModelDataUrl"]
    package = sagemaker.describe_model_package(ModelPackageName=container["ModelPackageName"])
    return package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]


def download_s3(uri: str, destination: Path, session: Any) -> Path:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    session.client("s3").download_file(bucket, key, str(destination))
    return destination


# --- the command -----------------------------------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "endpoint-test",
        help="smoke-test an endpoint: its answers on test images against the served artifact's own",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--test-dir", required=True, help="the test split: a folder or s3:// prefix of <class>/<image>")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images to send (default: %(default)s)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--endpoint", default=None, help="URL of an endpoint (default: the local one in --workdir)")
    target.add_argument(
        "--endpoint-name",
        default=None,
        help="name of a SageMaker endpoint (needs AWS credentials); with --local, a local one",
    )
    parser.add_argument("--model", type=Path, default=None, help="the served model.tar.gz or folder (default: found)")
    parser.add_argument("--region", default=None, help="AWS region of --endpoint-name (default: AWS_REGION)")
    parser.add_argument("--workdir", type=Path, default=Path(config.LOCAL_WORKDIR), help="the local workdir")
    backend.add_endpoint_name_argument(parser, "--name")
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="on failure, serve the previous Approved version again and reject this one (local endpoints)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--local", action="store_true", help="a local endpoint of --workdir (the default without --endpoint-name)"
    )
    parser.set_defaults(func=run_endpoint_test)


def run_endpoint_test(args: argparse.Namespace) -> int:
    if getattr(args, "local", False) and args.endpoint_name:  # --local --endpoint-name NAME: the local endpoint NAME
        try:
            args.name, args.endpoint_name = names.check_name("endpoint", args.endpoint_name), None
        except ValueError as error:
            raise CommandError(str(error)) from error
    if args.images < 1:
        raise CommandError(f"--images {args.images}: send at least one image")
    if args.rollback and (args.endpoint or args.endpoint_name):
        raise CommandError(
            "--rollback works on the local endpoint of --workdir; for SageMaker use "
            "`python -m pipelines.run deploy --model-package-arn ARN --smoke-test-dir DIR`"
        )
    from botocore.exceptions import BotoCoreError, ClientError

    with tempfile.TemporaryDirectory(prefix="endpoint-test-") as scratch:
        try:
            record, invoke, model_dir, images = _resolve(args, Path(scratch))
            report = run_smoke_test(invoke, images, offline_answers(model_dir, images))
        except SmokeTestError as error:
            raise CommandError(str(error)) from error
        except (BotoCoreError, ClientError) as error:  # no credentials, no such endpoint, access denied
            raise CommandError(f"AWS call failed: {error}; check the credentials, --region and the name") from error
    print_report(report, args.json)
    if not report.ok and args.rollback and record is not None:
        print(rollback_local(args.workdir.resolve(), args.name, record, report.summary()), file=sys.stderr)
    return 0 if report.ok else 1


def print_report(report: SmokeReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    for check in report.failures:
        print(f"  {check.image}: {check.problem}")
    print(report.summary())


def _resolve(args: argparse.Namespace, scratch: Path) -> tuple[dict | None, Invoke, Path, list[tuple[str, bytes]]]:
    """(local record or None, the invoker, the served artifact's folder, the test images)."""
    from steps import evaluate

    session = None
    if args.endpoint_name or args.test_dir.startswith("s3://"):
        import boto3

        session = boto3.session.Session(region_name=args.region)
    record = None
    if args.endpoint_name:
        invoke = sagemaker_invoker(args.endpoint_name, session)
        model = args.model or download_s3(
            sagemaker_model_data(args.endpoint_name, session), scratch / "m.tar.gz", session
        )
    elif args.endpoint:
        invoke, model = url_invoker(args.endpoint), args.model
    else:
        from pipelines.serving import endpoint

        try:
            record = endpoint.status(args.workdir.resolve(), args.name)
        except endpoint.EndpointError as error:
            raise SmokeTestError(str(error)) from error
        if record is None or record["EndpointStatus"] != "InService":
            raise SmokeTestError(f"no local endpoint {args.name} is serving in {args.workdir}: pass --endpoint URL")
        invoke, model = url_invoker(record["url"]), args.model or Path(record["model_dir"])
    if model is None:
        raise SmokeTestError("--model is needed with --endpoint: the model.tar.gz (or folder) the endpoint serves")
    try:
        model_dir = evaluate.resolve_model_dir(Path(model), scratch)
    except evaluate.EvaluationError as error:
        raise SmokeTestError(str(error)) from error
    if args.test_dir.startswith("s3://"):
        images = s3_test_images(args.test_dir, args.images, session)
    else:
        images = local_test_images(Path(args.test_dir), args.images)
    if not images:
        raise SmokeTestError(f"--test-dir {args.test_dir} holds no <class>/<image> files")
    return record, invoke, model_dir, images


def rollback_local(workdir: Path, name: str, record: dict[str, Any], reason: str) -> str:
    """Serve the newest earlier Approved version again, then mark the tested one Rejected. Returns what was done.

    In that order, so that a deploy that fails (an unreadable or changed model, a full disk, a server that does not
    start) leaves the registry as it was: the tested version stays Approved, and the line says what the endpoint
    serves. Raises CommandError (one line) when the rollback could not be done or finished.
    """
    from botocore.exceptions import ClientError

    from pipelines.local.registry import RegistryError
    from pipelines.local.sagemaker import LocalSageMaker, arn
    from pipelines.serving import endpoint

    client = LocalSageMaker(workdir)
    group, version = record["ModelPackageGroupName"], record["ModelPackageVersion"]
    try:
        earlier = backend.previous_approved_package(client, group, version)
    except (ClientError, RegistryError) as error:
        message = f"no rollback: {_first_line(error)}; the endpoint keeps serving version {version}"
        raise CommandError(message) from error
    if earlier is None:
        return f"no rollback: {group} has no Approved version before {version}; the endpoint keeps serving it"
    previous_arn = earlier["ModelPackageArn"]
    ray = record.get("host") == "ray"
    try:
        client.verified_package(previous_arn)
        previous = client.registry.by_arn(previous_arn)
        served = endpoint.deploy(workdir, name, previous, port=int(record["port"]), ray=ray)
    except (ClientError, endpoint.EndpointError, RegistryError, fsutil.WorkdirBusy, OSError) as error:
        shown = previous_arn.rsplit("/", 1)[-1]
        raise CommandError(
            f"no rollback: version {shown} could not be served ({_first_line(error)}); "
            f"version {version} stays Approved and {_serving(workdir, name)}"
        ) from error
    try:
        client.update_model_package(
            ModelPackageArn=arn("model-package", f"{group}/{version}"),
            ModelApprovalStatus="Rejected",
            ApprovalDescription=f"endpoint-test failed: {reason}"[:1024],
        )
    except (ClientError, RegistryError, fsutil.WorkdirBusy, OSError) as error:
        raise CommandError(
            f"rolled back half way: {name} serves version {previous['ModelPackageVersion']} again, but version "
            f"{version} could not be marked Rejected ({_first_line(error)}); mark it with "
            f"'python -m pipelines.run reject {version} --local'"
        ) from error
    return (
        f"rolled back: {name} serves version {previous['ModelPackageVersion']} again at {served['url']}; "
        f"version {version} is now Rejected"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _serving(workdir: Path, name: str) -> str:
    """What the endpoint serves now, in words (after a failed deploy)."""
    from pipelines.serving import endpoint

    try:
        state = endpoint.status(workdir, name)
    except endpoint.EndpointError as error:
        return f"the endpoint's record cannot be read ({_first_line(error)})"
    if state is None or state["EndpointStatus"] != "InService":
        return f"{name} serves nothing now: start it with 'python -m pipelines.run endpoint start'"
    return f"{name} still serves version {state['ModelPackageVersion']}"
