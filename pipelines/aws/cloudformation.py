"""Create or update a CloudFormation stack through a change set, and follow it: what ``bootstrap`` runs.

:func:`deploy` makes a change set, prints what it will change, executes it, prints one line per resource event
while it waits, and ends with the stack's outputs, or with a :class:`StackError` that names the first resource
that failed and why, and what to do about the stack. A change set that would change nothing is deleted and
reported as "no changes": nothing is executed. A first creation that fails deletes its stack
(``OnStackFailure=DELETE``), so it leaves no half-made stack behind.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

# Stack states a change set can be made for, by the type of change set.
UPDATABLE_STATUSES = (
    "CREATE_COMPLETE",
    "UPDATE_COMPLETE",
    "UPDATE_ROLLBACK_COMPLETE",
    "IMPORT_COMPLETE",
    "IMPORT_ROLLBACK_COMPLETE",
)
SUCCESS_STATUSES = ("CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE")
# What CloudFormation says when a change set would change nothing.
NO_CHANGE_REASONS = ("didn't contain changes", "No updates are to be performed")
CANCELLED_REASONS = ("Resource creation cancelled", "Resource update cancelled")


class StackError(Exception):
    """A one-line, user-facing account of what went wrong with the stack and what to do."""


@dataclass
class Deployment:
    """What :func:`deploy` did."""

    stack_name: str
    kind: str = ""  # the change set's type: CREATE or UPDATE
    stack_id: str = ""
    action: str = ""  # "created", "updated", "no changes", "change set created (not executed)"
    status: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    change_set_id: str = ""


# --- reading the stack -----------------------------------------------------------------------------------------


def describe_stack(cloudformation: Any, stack_name: str) -> dict[str, Any] | None:
    """The stack, or None if there is none of that name (deleted stacks do not count)."""
    from botocore.exceptions import ClientError

    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as error:
        if "does not exist" in str(error):
            return None
        raise
    return stacks[0] if stacks else None


def stack_outputs(stack: Mapping[str, Any]) -> dict[str, str]:
    return {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs") or []}


def delete_command(stack_name: str, region: str) -> str:
    return f"aws cloudformation delete-stack --stack-name {stack_name} --region {region}"


def change_set_type(stack: Mapping[str, Any] | None, region: str) -> str:
    """CREATE for no stack (or one only under review), UPDATE for a stable one; else a StackError saying what to do."""
    if stack is None or stack["StackStatus"] == "REVIEW_IN_PROGRESS":
        return "CREATE"
    status, name = stack["StackStatus"], stack["StackName"]
    if status in UPDATABLE_STATUSES:
        return "UPDATE"
    if status in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED"):
        what = {
            "ROLLBACK_COMPLETE": "its creation failed and was rolled back, and a stack in that state cannot be updated",
            "ROLLBACK_FAILED": "its creation failed and the rollback failed too",
            "DELETE_FAILED": "a deletion of it failed",
        }[status]
        raise StackError(
            f"stack {name} is in {status} ({what}): see why with `aws cloudformation describe-stack-events "
            f"--stack-name {name} --region {region}`, delete it with `{delete_command(name, region)}`, "
            "then run bootstrap again"
        )
    if status == "UPDATE_ROLLBACK_FAILED":
        raise StackError(
            f"stack {name} is in UPDATE_ROLLBACK_FAILED: finish the rollback with `aws cloudformation "
            f"continue-update-rollback --stack-name {name} --region {region}` (skipping the resources it names if "
            "need be), then run bootstrap again"
        )
    if status.endswith("_IN_PROGRESS"):
        raise StackError(
            f"stack {name} is busy ({status}): wait for it with `aws cloudformation wait stack-update-complete "
            f"--stack-name {name} --region {region}` (or stack-create-complete), then run bootstrap again"
        )
    raise StackError(
        f"stack {name} is in {status}, which bootstrap cannot update: delete it with "
        f"`{delete_command(name, region)}` and run bootstrap again"
    )


# --- change sets -----------------------------------------------------------------------------------------------


def wait_for_change_set(
    cloudformation: Any, change_set_id: str, poll_seconds: float, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Poll until the change set is made (CREATE_COMPLETE) or refused (FAILED)."""
    while True:
        described = cloudformation.describe_change_set(ChangeSetName=change_set_id)
        if described["Status"] in ("CREATE_COMPLETE", "FAILED", "DELETE_COMPLETE", "DELETE_FAILED"):
            return described
        sleep(poll_seconds)


def change_set_changes(cloudformation: Any, change_set_id: str) -> list[dict[str, Any]]:
    """Every resource change of the change set (all pages)."""
    changes: list[dict[str, Any]] = []
    request: dict[str, Any] = {"ChangeSetName": change_set_id}
    while True:
        page = cloudformation.describe_change_set(**request)
        changes.extend(change["ResourceChange"] for change in page.get("Changes", []) if "ResourceChange" in change)
        if not page.get("NextToken"):
            return changes
        request["NextToken"] = page["NextToken"]


_ACTION_MARKS = {"Add": "+", "Modify": "~", "Remove": "-", "Import": "<", "Dynamic": "?"}


def format_change(change: Mapping[str, Any]) -> str:
    """``~ Modify  BuildProject (AWS::CodeBuild::Project)  replacement: False  (Properties)``."""
    action = change.get("Action", "?")
    line = (
        f"{_ACTION_MARKS.get(action, '?')} {action:<7} {change.get('LogicalResourceId')} ({change.get('ResourceType')})"
    )
    if action == "Modify":
        line += f"  replacement: {change.get('Replacement', '?')}"
        scope = ", ".join(change.get("Scope") or [])
        if scope:
            line += f"  ({scope})"
    return line


# --- events ----------------------------------------------------------------------------------------------------


def _new_events(cloudformation: Any, stack_id: str, seen: set[str]) -> list[dict[str, Any]]:
    """Events not seen yet, oldest first (CloudFormation lists them newest first)."""
    fresh: list[dict[str, Any]] = []
    request: dict[str, Any] = {"StackName": stack_id}
    while True:
        page = cloudformation.describe_stack_events(**request)
        for event in page.get("StackEvents", []):
            if event["EventId"] in seen:
                return list(reversed(fresh))
            fresh.append(event)
        if not page.get("NextToken"):
            return list(reversed(fresh))
        request["NextToken"] = page["NextToken"]


def _latest_event_ids(cloudformation: Any, stack_id: str) -> set[str]:
    """The IDs of the stack's newest events: following from there prints only what happens from now on."""
    page = cloudformation.describe_stack_events(StackName=stack_id)
    return {event["EventId"] for event in page.get("StackEvents", [])}


def format_event(event: Mapping[str, Any]) -> str:
    """One line per event: time, status, type, logical ID and reason."""
    stamp = event.get("Timestamp")
    clock = stamp.astimezone(timezone.utc).strftime("%H:%M:%S") if isinstance(stamp, datetime) else str(stamp or "")
    line = (
        f"{clock}  {event.get('ResourceStatus', ''):<36} {event.get('ResourceType', ''):<36} "
        f"{event.get('LogicalResourceId', '')}"
    )
    reason = event.get("ResourceStatusReason")
    return f"{line}  {reason}" if reason else line


def first_failure(events: Iterable[Mapping[str, Any]], stack_name: str) -> Mapping[str, Any] | None:
    """The first resource event (oldest first) that failed for a reason of its own, not as a knock-on cancel."""
    failed = [
        event
        for event in events
        if str(event.get("ResourceStatus", "")).endswith("_FAILED")
        and not any(reason in str(event.get("ResourceStatusReason", "")) for reason in CANCELLED_REASONS)
    ]
    own = [event for event in failed if event.get("LogicalResourceId") != stack_name]
    return (own or failed or [None])[0]


def follow_stack(
    cloudformation: Any,
    stack_id: str,
    seen: set[str],
    *,
    out: TextIO,
    poll_seconds: float,
    timeout_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, list[dict[str, Any]]]:
    """Print the stack's new events until it stops changing; return its final status and the events printed."""
    deadline = clock() + timeout_seconds
    printed: list[dict[str, Any]] = []
    while True:
        status = cloudformation.describe_stacks(StackName=stack_id)["Stacks"][0]["StackStatus"]
        for event in _new_events(cloudformation, stack_id, seen):
            seen.add(event["EventId"])
            printed.append(event)
            print(format_event(event), file=out, flush=True)
        if not status.endswith("_IN_PROGRESS"):
            return status, printed
        if clock() > deadline:
            raise StackError(
                f"the stack is still {status} after {timeout_seconds:.0f} s; it goes on without bootstrap: follow it "
                f"with `aws cloudformation describe-stack-events --stack-name {stack_id}`"
            )
        sleep(poll_seconds)


# --- the whole deployment --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackRequest:
    """What to deploy."""

    stack_name: str
    template_body: str
    parameters: Mapping[str, str]
    tags: Mapping[str, str]
    capabilities: tuple[str, ...] = ("CAPABILITY_IAM",)
    import_existing_resources: bool = False


def deploy(
    cloudformation: Any,
    request: StackRequest,
    *,
    region: str,
    execute: bool = True,
    out: TextIO | None = None,
    poll_seconds: float = 5.0,
    timeout_seconds: float = 3600.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Deployment:
    """Create or update the stack through a change set; see the module docstring.

    Raises:
        StackError: the stack is in a state that cannot be updated, the change set was refused, or the stack
            failed (naming the first failing resource and its reason, and what to do about the stack).
    """
    out = out or sys.stdout
    stack = describe_stack(cloudformation, request.stack_name)
    kind = change_set_type(stack, region)
    result = Deployment(stack_name=request.stack_name, kind=kind)
    seen = _latest_event_ids(cloudformation, stack["StackId"]) if stack else set()
    created = cloudformation.create_change_set(**_change_set_request(request, kind))
    result.change_set_id, result.stack_id = created["Id"], created["StackId"]
    described = wait_for_change_set(cloudformation, result.change_set_id, poll_seconds, sleep)
    if described["Status"] == "FAILED":
        return _refused_change_set(cloudformation, request, kind, described, result, region)
    result.changes = change_set_changes(cloudformation, result.change_set_id)
    print(f"change set for stack {request.stack_name} ({kind}): {len(result.changes)} change(s)", file=out)
    for change in result.changes:
        print(f"  {format_change(change)}", file=out)
    if not execute:
        result.action = "change set created (not executed)"
        return result
    cloudformation.execute_change_set(ChangeSetName=result.change_set_id)
    print(f"executing; events of stack {request.stack_name}:", file=out, flush=True)
    status, events = follow_stack(
        cloudformation,
        result.stack_id,
        seen,
        out=out,
        poll_seconds=poll_seconds,
        timeout_seconds=timeout_seconds,
        sleep=sleep,
        clock=clock,
    )
    result.status = status
    if status not in SUCCESS_STATUSES:
        raise StackError(_failure_message(request.stack_name, kind, status, events, region))
    result.action = "created" if kind == "CREATE" else "updated"
    result.outputs = stack_outputs(cloudformation.describe_stacks(StackName=result.stack_id)["Stacks"][0])
    return result


def _change_set_request(request: StackRequest, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "StackName": request.stack_name,
        # Names are for people; a time stamp keeps them unique per stack (content lives in the template).
        "ChangeSetName": "bootstrap-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "ChangeSetType": kind,
        "TemplateBody": request.template_body,
        "Parameters": [{"ParameterKey": key, "ParameterValue": value} for key, value in request.parameters.items()],
        "Capabilities": list(request.capabilities),
        "Tags": [{"Key": key, "Value": value} for key, value in request.tags.items()],
        "Description": "python -m pipelines.run bootstrap",
    }
    if kind == "CREATE":
        body["OnStackFailure"] = "DELETE"  # a first creation that fails leaves no stack behind
    if request.import_existing_resources:
        body["ImportExistingResources"] = True
    return body


def _refused_change_set(
    cloudformation: Any,
    request: StackRequest,
    kind: str,
    described: Mapping[str, Any],
    result: Deployment,
    region: str,
) -> Deployment:
    """Delete a change set CloudFormation refused; "no changes" is a result, anything else a StackError."""
    reason = str(described.get("StatusReason", ""))
    cloudformation.delete_change_set(ChangeSetName=result.change_set_id)
    if kind == "CREATE":
        # The change set made an empty stack (REVIEW_IN_PROGRESS) to hang on: remove it with the change set.
        cloudformation.delete_stack(StackName=result.stack_id)
    if any(text in reason for text in NO_CHANGE_REASONS):
        result.action = "no changes"
        stack = cloudformation.describe_stacks(StackName=result.stack_id)["Stacks"][0]
        result.status, result.outputs = stack["StackStatus"], stack_outputs(stack)
        return result
    removed = " (the empty stack it made was deleted)" if kind == "CREATE" else ""
    raise StackError(f"CloudFormation refused the change set for stack {request.stack_name}: {reason}{removed}")


def _failure_message(stack_name: str, kind: str, status: str, events: list[dict[str, Any]], region: str) -> str:
    failure = first_failure(events, stack_name)
    cause = (
        f"first failure: {failure.get('LogicalResourceId')} ({failure.get('ResourceType')}) "
        f"{failure.get('ResourceStatus')}: {failure.get('ResourceStatusReason', 'no reason given')}"
        if failure
        else "no resource event says why"
    )
    if kind == "CREATE" and status == "DELETE_COMPLETE":
        after = "the stack was deleted again, nothing is left of it; fix the cause and run bootstrap again"
    elif status == "UPDATE_ROLLBACK_COMPLETE":
        after = "the stack was rolled back to its previous state and works as before; fix the cause and run again"
    else:
        after = (
            f"the stack is left in {status}: see `aws cloudformation describe-stack-events --stack-name {stack_name} "
            f"--region {region}`; delete it with `{delete_command(stack_name, region)}` if it is not needed"
        )
    return f"stack {stack_name} {kind.lower()} failed ({status}): {cause}; {after}"
