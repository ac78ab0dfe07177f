#!/usr/bin/env bash
# What MLflow tracking adds to a fresh install: `pip install -e ".[dev]"` into a new venv, of this checkout and,
# side by side, of the same commit whose setup.py lacks the MLflow requirements (runtime mlflow-skinny, sqlalchemy
# and alembic; dev's full mlflow, which the tests' `mlflow server` needs). pip's cache is shared, so run it once
# first if the cache is cold. Target: at most +45 s. About 10 minutes on 2 cores.
#
#     bench/install_bench.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/without" 2>/dev/null || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$work/without" HEAD
python - "$work/without/setup.py" <<'PY'
import sys

path = sys.argv[1]
text = open(path).read()
for requirement in ('"mlflow-skinny>=3.13,<4",', '"sqlalchemy>=2",', '"alembic>=1.13",', "*MLFLOW_UI_REQUIREMENTS,"):
    if requirement not in text:
        raise SystemExit(f"setup.py no longer names {requirement}: update this bench")
    text = text.replace(requirement, "")
open(path, "w").write(text)
PY
declare -A seconds
for variant in without with; do
  source_dir=$repo
  [ "$variant" = without ] && source_dir=$work/without
  python -m venv "$work/venv-$variant"
  start=$(date +%s.%N)
  (cd "$source_dir" && "$work/venv-$variant/bin/python" -m pip install -q -e ".[dev]" > "$work/$variant.log" 2>&1)
  seconds[$variant]=$(python -c "print(round($(date +%s.%N) - $start, 1))")
  echo "fresh install, $variant MLflow: ${seconds[$variant]} s"
done
python -c "w, b = ${seconds[with]}, ${seconds[without]}; print(f'fresh install s with mlflow: {w} vs baseline {b} ratio={b / w:.3f}')"
