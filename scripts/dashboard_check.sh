#!/usr/bin/env bash
# End-to-end dashboard check: starts a private local ZenML server, runs the tiny
# dpo_sdxl pipeline twice against it, checks the summary run.py prints, and drives
# the dashboard in headless Chromium (log in, run, DAG, cached step, sample grid,
# the reports the summary names). ~2 min on a quiet 2-core machine; CI runs the same
# test (.ci/run). Screenshots and run.py's output: outputs/dashboard/. Your own
# ZenML config is not touched.
#
# Needs: Debian's chromium (apt-get install -y chromium) and playwright
# (pip install --require-hashes --no-deps -r requirements/test.lock, see README).
# Playwright drives the system Chromium; never run `playwright install`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    echo "chromium is not installed: apt-get install -y chromium" >&2
    exit 2
fi
if ! python -c "import playwright.sync_api" 2>/dev/null; then
    echo "playwright is not installed: pip install --require-hashes --no-deps -r requirements/test.lock (see README)" >&2
    exit 2
fi

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -m browser -s -q tests/test_dashboard_browser.py "$@"
ls -l outputs/dashboard/*.png
