#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then lint, type-check, check the import rules and run every
# test, the end-to-end tests against a real Label Studio included (its own cached venv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check backend benchmark tests scripts
.venv/bin/ruff format --check backend benchmark tests scripts
.venv/bin/mypy
.venv/bin/lint-imports --no-cache  # docs/architecture.md: no import loops, no arrow pointing up
export BOXLOOP_SHARED_DATA=${BOXLOOP_SHARED_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/pytest "$@"
