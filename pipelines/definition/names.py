"""AWS's own rules for names and ARNs that several parts check: SageMaker names that become paths, Lambda
function names, the ARN partition of a region."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

# SageMaker's own name patterns (botocore's service model; a test keeps them equal) for the names that become folder
# and file names in the workdir: an endpoint's record and model folders, a model package group's registry folder.
SAGEMAKER_NAME_PATTERNS: dict[str, tuple[str, str]] = {  # kind -> (SageMaker's shape, its pattern; 1-63 chars)
    "endpoint": ("EndpointName", r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"),
    "model package group": ("EntityName", r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}"),
}
# A Lambda function name (CreateFunction's FunctionName without the ARN forms).
LAMBDA_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def partition_for_region(region: str) -> str:
    """The ARN partition of a region (aws, aws-cn or aws-us-gov)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def check_name(kind: str, name: Any) -> str:
    """``name`` if it is a valid SageMaker name of ``kind`` (see SAGEMAKER_NAME_PATTERNS), else ValueError."""
    shape, pattern = SAGEMAKER_NAME_PATTERNS[kind]
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ValueError(
            f"{kind} name {name!r} is not a SageMaker {shape}: 1 to 63 letters, digits and hyphens, starting and "
            "ending with a letter or digit (it names files in the workdir, so it may not be a path)"
        )
    return name


def name_argument(kind: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_name(kind, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse
