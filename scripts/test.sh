#!/usr/bin/env bash
# The test command (README, .ci/run): install HeteroScale and its test extras into
# .venv, prepare what the integration tiers use (scripts/test-deps.sh), run pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m vllm` for the real-vLLM tier.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
scripts/test-deps.sh || echo "test.sh: some integration prerequisites could not be set up; their tiers will skip" >&2
exec .venv/bin/python -m pytest "$@"
