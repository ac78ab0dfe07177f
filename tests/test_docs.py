"""The documentation: README.md and docs/*.md.

Every relative link points at a file that exists (and, with a ``#fragment``, at a heading of that file), the
README stays a short front page, and its quick-start commands are the ones CI (``.ci/run``) runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CI_SCRIPT = ROOT / ".ci" / "run"
README_MAX_LINES = 320

# [text](target) outside code; images too. The target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(page: Path) -> list[str]:
    targets = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_the_docs_pages_exist() -> None:
    names = {path.name for path in DOCS.glob("*.md")}
    expected = {
        "README.md",
        "architecture.md",
        "cli.md",
        "local.md",
        "sagemaker.md",
        "deployment.md",
        "iam.md",
        "data.md",
        "training.md",
        "serving.md",
        "testing.md",
    }
    assert expected <= names, f"docs/ lacks {sorted(expected - names)}"


@pytest.mark.parametrize("page", _pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.is_relative_to(ROOT):
            broken.append(f"{target}: leads outside the repository")
        elif not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif (
            fragment
            and destination.suffix == ".md"
            and fragment not in heading_anchors(destination.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target}: {destination.name} has no heading with the anchor #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme_or_the_index() -> None:
    linked = {
        (page.parent / target.partition("#")[0]).resolve()
        for page in (README, DOCS / "README.md")
        for target in relative_links(page)
    }
    unlinked = [path.name for path in DOCS.glob("*.md") if path.resolve() not in linked and path.name != "README.md"]
    assert not unlinked, f"docs pages no one links to: {unlinked}"


def test_the_readme_is_a_short_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move reference text to docs/"
    )


def _shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks of a Markdown text, comments and blank lines dropped."""
    commands, in_bash = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.split("  #", 1)[0].strip())
    return commands


def test_the_quick_start_commands_are_the_ones_ci_runs() -> None:
    readme = README.read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = _shell_commands(quick_start)
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()]
    install, main_job, tests = 'python -m pip install -e ".[dev]"', "python -m pipelines.run local", "python -m pytest"
    # The first three commands of the quick start are install, main job and tests, in that order.
    assert commands[:3] == [install, main_job, tests]
    # CI installs and tests with exactly these lines (its last command is the README's test command).
    assert install in ci_lines
    assert [line for line in ci_lines if line and not line.startswith("#")][-1] == tests
    # The project's check that the README names the main job and the tests.
    assert "pipelines.run local" in readme and "pytest" in readme


def test_no_issue_numbers_or_paths_outside_the_repository() -> None:
    pattern = re.compile(r"issue [0-9]|shared folder|\.\./shared", re.IGNORECASE)
    files = [*_pages(), *ROOT.glob("bench/*.py")]
    for folder in ("pipelines", "steps", "entrypoints", "tests", "bench"):
        files += (ROOT / folder).rglob("*.py")
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(set(files))
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "say what is meant instead:\n" + "\n".join(hits)


def test_heading_anchors_follow_github() -> None:
    text = (
        "# Training: `entrypoints/train.py`\n## Several processes: `torchrun`\n"
        "```\n# not a heading\n```\n## Tests\n## Tests\n"
    )
    assert heading_anchors(text) == {
        "training-entrypointstrainpy",
        "several-processes-torchrun",
        "tests",
        "tests-1",
    }


def test_the_cli_page_names_every_subcommand() -> None:
    from pipelines.run import build_parser

    subcommands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    cli_page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in subcommands.choices if f"| `{name}" not in cli_page]
    assert not missing, f"docs/cli.md has no row for: {missing}"
