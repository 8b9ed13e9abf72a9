"""End to end: the local ZenML dashboard shows a run, its DAG, a cached step and what the run's summary names.

Starts the local ZenML server (``zenml login --local``) in a private config
directory, runs ``python run.py --pipeline dpo_sdxl --profile tiny`` twice
against it (the second run changes beta, so loading, validation and encoding
come from the cache), checks the summary run.py prints when the second run
ends (win rate with its 95% CI, the promotion gates, the dashboard URL, and
for the sample grid and each report a file that exists and an artifact
version the server knows), then drives headless Chromium like a person would:
open the dashboard and get past the first-visit account form, open the run
from the URL run.py printed, see every recorded step and artifact in the DAG,
open a cached step, a re-run step, the sample grid and every report the
summary names (HTML reports in their frame, whatever else as its preview).
Screenshots go to ``outputs/dashboard/`` (``failure.png`` when it fails), with what
run.py printed (``run_1.log``, ``run_2.log``).

CI runs it (``.ci/run`` installs Debian's ``chromium``; playwright is in
requirements/test.lock): it runs when ``CI=true``, ``ALIGNMENT_BROWSER_TESTS=1``
or ``-m browser`` asks for it, and then fails if chromium or playwright is
missing. Otherwise it is skipped, so a developer without chromium keeps a
green ``python -m pytest -q``:

    python -m pytest -m browser tests/test_dashboard_browser.py     # or scripts/dashboard_check.sh

About 2 min on a quiet 2-core machine (most of it the server start and the
two runs). Playwright never downloads a browser here: it drives the system
Chromium through ``executable_path``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = REPO_ROOT / "outputs" / "dashboard"
STEPS = ("load_preferences", "validate_preferences", "encode_pairs", "train_alignment", "evaluate_alignment")
CACHED_ON_RERUN = ("load_preferences", "validate_preferences", "encode_pairs")
# The DAG the dashboard must draw is whatever the server recorded for the run (see
# _recorded_steps); these are the parts README points people to, so they must be in it.
HTML_REPORTS = {"validation_html", "drift_report"}
CORE_OUTPUTS = {"train_alignment": {"lora_weights"}, "evaluate_alignment": {"eval_report", "sample_grid"}}
DASHBOARD_RUN_URL = re.compile(r"Dashboard URL for Pipeline Run:\s*(http://\S+/runs/[0-9a-f-]{36})")
# The summary run.py prints when a run ends (alignment/run_summary.py).
SUMMARY_TITLE = re.compile(r"^run (dpo_sdxl-\S+) \((\w+)\)$", re.M)
WIN_RATE = re.compile(r"^  win rate vs base\s+(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]\s+0\.500$", re.M)
GATES = re.compile(r"^promotion to staging \(configs/promote\.yaml\): would (pass|FAIL)$", re.M)
DESCRIBE = re.compile(r"^zenml artifact version describe ([0-9a-f-]{36})$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
USER_DISPLAY_NAME = "Dashboard Check"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(2700)]


def browser_tests_asked(markexpr: str, environ: dict[str, str]) -> bool:
    """Whether this session should run the browser test: ``-m browser``, ``ALIGNMENT_BROWSER_TESTS=1``
    or CI (``CI=true``, which .ci/run sets); ``ALIGNMENT_BROWSER_TESTS=0`` turns it off even in CI."""
    flag = environ.get("ALIGNMENT_BROWSER_TESTS", "").strip().lower()
    if flag in {"0", "false", "no"}:
        return False
    if re.search(r"(?<!not )\bbrowser\b", markexpr or ""):
        return True
    return flag in {"1", "true", "yes"} or environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module", autouse=True)
def _only_when_asked(request):
    """Skip unless asked for (see browser_tests_asked): CI runs it, a developer's default run skips it.

    Module-scoped and requested by the server fixture, so the skip comes before
    any server is started (a function-scoped one would run after module fixtures)."""
    if not browser_tests_asked(request.config.getoption("markexpr", "") or "", dict(os.environ)):
        pytest.skip(
            "dashboard browser test (needs Debian's chromium and playwright; CI runs it): "
            "ALIGNMENT_BROWSER_TESTS=1 python -m pytest -q, or python -m pytest -m browser tests/test_dashboard_browser.py"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _zenml_cli() -> str:
    # The zenml entry point of the interpreter running the tests, not whatever is first on PATH.
    candidate = Path(sys.executable).with_name("zenml")
    found = str(candidate) if candidate.is_file() else shutil.which("zenml")
    if not found:
        raise RuntimeError(f"no `zenml` command next to {sys.executable} or on PATH: pip install -e .")
    return found


def _run(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = ANSI.sub("", proc.stdout + proc.stderr)
    print(f"[dashboard test] {what}: {time.perf_counter() - started:.0f} s")
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output[-4000:]}")
    return output


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def chromium_path(_only_when_asked) -> str:
    """Asked for but not installed is a failure, not a skip: a CI run must not pass without the check."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "the dashboard browser test was asked for (CI, ALIGNMENT_BROWSER_TESTS or -m browser) but Debian's "
            "chromium is not installed: apt-get install -y chromium (or ALIGNMENT_BROWSER_TESTS=0 to skip it)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "playwright is not installed: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 pip install --require-hashes --no-deps "
            "-r requirements/test.lock (README, Tests)"
        )
    return path


@pytest.fixture(scope="module")
def local_server(chromium_path, tmp_path_factory):
    """`zenml login --local` in a private config dir; stopped with `zenml logout --local`."""
    home = tmp_path_factory.mktemp("dashboard")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        ZENML_CONFIG_PATH=str(home / "zenml"),
        ZENML_ANALYTICS_OPT_IN="false",
        ZENML_AUTO_OPEN_DASHBOARD="false",
        ZENML_ENABLE_RICH_TRACEBACK="false",
        # INFO: run.py's output must carry ZenML's "Dashboard URL for Pipeline Run" and
        # "Using cached version of step" lines (tests/conftest.py sets WARN for the test process).
        ZENML_LOGGING_VERBOSITY="INFO",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    zenml = _zenml_cli()
    pid_file = home / "zenml" / "zen_server" / "daemon" / "service.pid"
    try:
        _run([zenml, "login", "--local", "--port", str(port)], env, timeout=600, what="zenml login --local")
        yield {"url": f"http://127.0.0.1:{port}", "env": env, "home": home}
    finally:
        try:
            _run([zenml, "logout", "--local"], env, timeout=180, what="zenml logout --local")
        finally:
            # The daemon is ours (its pid file lives in our private config dir): make sure it is gone.
            deadline = time.monotonic() + 30
            while _port_open(port) and time.monotonic() < deadline:
                time.sleep(1)
            if _port_open(port) and pid_file.is_file():
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@pytest.fixture(scope="module")
def two_runs(local_server):
    """Two tiny dpo_sdxl runs against the server; the second changes beta only.

    Returns the dashboard URLs run.py printed for both runs and the second run's output."""
    tmp = local_server["home"]
    base = [
        sys.executable,
        "run.py",
        "--pipeline",
        "dpo_sdxl",
        "--profile",
        "tiny",
        "--set",
        "parameters.training.max_train_steps=3",
        "--set",
        f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
        # 12 of the 48 held-out prompts: evaluation was half of each run's time (sampling base
        # and aligned), and the summary, the grid and the reports look the same with fewer.
        "--set",
        "parameters.evaluation.max_prompts=12",
    ]
    first = _run(base, local_server["env"], timeout=1200, what="run.py dpo_sdxl (first run)")
    second = _run(
        [*base, "--set", "parameters.training.beta=2500"],
        local_server["env"],
        timeout=1200,
        what="run.py dpo_sdxl (beta changed)",
    )
    # What run.py printed, for the person reading a failure (or the step timings).
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    for index, out in enumerate((first, second), start=1):
        (SCREENSHOT_DIR / f"run_{index}.log").write_text(out)
    urls = [DASHBOARD_RUN_URL.search(out) for out in (first, second)]
    assert all(urls), f"run.py did not print a dashboard URL for the run:\n{second[-3000:]}"
    for step in CACHED_ON_RERUN:
        assert f"Using cached version of step {step}" in second, step
    assert urls[1].group(1).startswith(local_server["url"]), (urls[1].group(1), local_server["url"])
    return urls[0].group(1), urls[1].group(1), second


def _api(base_url: str, path: str, **query) -> dict:
    """GET a route of the server's REST API (the local server runs without authentication)."""
    url = f"{base_url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our local server
        return json.load(response)


def _recorded_steps(base_url: str, run_url: str) -> dict[str, tuple[str, set[str]]]:
    """{step name: (status, output artifact names)} of a run, from the server's REST API."""
    page = _api(base_url, "steps", pipeline_run_id=run_url.rsplit("/", 1)[-1], size=100)
    assert page["total"] == len(page["items"]), "more steps than one page of the API"
    return {item["name"]: (item["body"]["status"], set(item["resources"]["outputs"])) for item in page["items"]}


def parse_summary(output: str) -> dict:
    """The end-of-run summary run.py printed (alignment/run_summary.py), as
    ``{"run", "status", "win_rate", "ci", "gates", "dashboard", "store", "artifacts": {name: {"path", "id"}}}``.
    Fails with the printed text when a part is missing."""
    assert "(no run summary:" not in output, output[-3000:]
    titles = list(SUMMARY_TITLE.finditer(output))
    assert titles, f"run.py printed no run summary (`run <name> (<status>)`):\n{output[-3000:]}"
    text = output[titles[-1].start() :]
    win, gates = WIN_RATE.search(text), GATES.search(text)
    assert win, f"no `win rate vs base <rate> [<low>, <high>]` line in the summary:\n{text}"
    assert gates, f"no `promotion to staging (configs/promote.yaml): would ...` line in the summary:\n{text}"
    assert "\nopen:\n" in text, f"no `open:` block in the summary:\n{text}"
    summary = {
        "run": titles[-1].group(1),
        "status": titles[-1].group(2),
        "win_rate": float(win.group(1)),
        "ci": (float(win.group(2)), float(win.group(3))),
        "gates": gates.group(1),
        "dashboard": None,
        "store": None,
        "artifacts": {},
    }
    name = None
    for line in text.split("\nopen:\n", 1)[1].splitlines():
        if not line.startswith("  "):
            break
        labelled = re.match(r"^  (files in|[A-Za-z0-9_]+)\s{2,}(\S.*)$", line)
        if labelled:
            name, value = labelled.group(1), labelled.group(2).strip()
        else:  # a continuation line: the artifact above's describe command
            value = line.strip()
        if name == "dashboard":
            summary["dashboard"] = value
        elif name == "files in":
            summary["store"] = value
        elif name is not None:
            entry = summary["artifacts"].setdefault(name, {"path": None, "id": None})
            describe = DESCRIBE.match(value)
            if describe:
                entry["id"] = describe.group(1)
            else:
                entry["path"] = value
    return summary


def _summary_file(summary: dict, path: str) -> Path:
    """A path the summary printed: relative to `files in` (the artifact store) unless absolute."""
    return Path(path) if path.startswith("/") or not summary["store"] else Path(summary["store"]) / path


def check_summary(summary: dict, base_url: str, run_url: str, recorded: dict[str, tuple[str, set[str]]]) -> dict:
    """What the printed summary says agrees with the run the server recorded.

    Returns ``{artifact name: [(visualization type, label), ...]}`` of the artifacts the summary names."""
    assert summary["status"] == "completed", summary
    low, high = summary["ci"]
    assert 0.0 <= low <= summary["win_rate"] <= high <= 1.0, summary
    # The dashboard line is this run's page on our server (the URL ZenML printed for the run).
    assert summary["dashboard"] == run_url, (summary["dashboard"], run_url)
    outputs = set().union(*(names for _status, names in recorded.values()))
    named = summary["artifacts"]
    assert {"sample_grid", "eval_report"} <= set(named), f"the summary names no sample grid / eval report: {named}"
    visualizations = {}
    for name, entry in named.items():
        assert name in outputs, f"the summary names {name}, which no step of the run outputs: {sorted(outputs)}"
        assert entry["id"], f"no `zenml artifact version describe <id>` for {name}: {entry}"
        version = _api(base_url, f"artifact_versions/{entry['id']}", hydrate="true")
        assert version["body"]["artifact"]["name"] == name, (name, version["body"]["artifact"]["name"])
        # (type, the label the dashboard's visualization chooser gives it: the file name of its uri)
        visualizations[name] = [
            (v["body"]["type"], v["body"]["uri"].replace("\\", "/").rsplit("/", 1)[-1])
            for v in (version["metadata"] or {}).get("visualizations") or []
        ]
        assert entry["path"], f"no file for {name} in the summary: {entry}"
        file = _summary_file(summary, entry["path"])
        assert file.exists(), f"the summary's file for {name} does not exist: {file}"
        if name == "sample_grid":
            from PIL import Image

            # Base above aligned, each sample enlarged to >= 128 px: at least 2 x 128 px high.
            with Image.open(file) as grid:
                assert grid.format == "PNG" and grid.height >= 256 and grid.width >= 128, (grid.format, grid.size)
        # The eval report is built-in JSON (data.json), alone or beside its HTML view.
        report_file = file if file.suffix == ".json" else file / "data.json"
        if name == "eval_report" and report_file.is_file():
            report = json.loads(report_file.read_text())
            if isinstance(report, dict) and "win_rate_vs_base" in report:
                assert round(float(report["win_rate_vs_base"]), 3) == summary["win_rate"], (report, summary)
    return visualizations


def _open_dashboard(page, base_url: str) -> None:
    """What a person does on a fresh local server: it has no password (NO_AUTH,
    user `default`), but the first visit asks for account details and a survey,
    then lands on the onboarding page; the home page greets the user by name."""
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    name_field = page.get_by_label("Name")
    greeting = page.get_by_text(re.compile(rf"^(Hi|Welcome back), {USER_DISPLAY_NAME}$"))
    expect(name_field.or_(greeting).first).to_be_visible()
    if name_field.is_visible():
        name_field.fill(USER_DISPLAY_NAME)
        page.get_by_role("checkbox", name=re.compile("receive news")).click()
        page.get_by_role("button", name="Continue").click()
        page.get_by_text("ML Engineer", exact=True).click()
        page.get_by_text("My Laptop", exact=True).click()
        page.get_by_role("button", name="Continue").click()
        page.get_by_text("Skip this step").click()
        expect(page.get_by_text("Your ZenML account is now updated")).to_be_visible()
        page.get_by_role("link", name="Go to Dashboard").click()
        expect(greeting).to_be_visible()
    page.goto(base_url + "/")
    expect(page.get_by_text(f"Welcome back, {USER_DISPLAY_NAME}", exact=True)).to_be_visible()


def _detail(sheet, label: str):
    """The value cell next to a label in the step sheet's details list (<dt>label</dt><dd>value</dd>)."""
    return sheet.locator("dt", has_text=re.compile(rf"^{label}$")).locator("xpath=following-sibling::dd[1]")


def _artifact_node(page, step: str, name: str):
    """The DAG node of a step's output artifact (test id `rf__node-<step>/outputs/<kind>/<name>`)."""
    return page.locator(f'[data-testid^="rf__node-{step}/outputs/"][data-testid$="/{name}"]')


def _preview_artifact(page, step: str, name: str) -> None:
    """Click an artifact node of the DAG and load its visualization, as a person would."""
    _artifact_node(page, step, name).get_by_role("button", name=name).click()
    sheet = page.get_by_role("dialog")
    sheet.get_by_role("tab", name="Visualization").click()
    sheet.get_by_role("button", name="Load Preview").click()


def _close_sheet(page) -> None:
    from playwright.sync_api import expect

    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)


def test_dashboard_shows_run_dag_and_cached_step(local_server, two_runs, chromium_path):
    first_url, second_url, second_output = two_runs
    assert first_url != second_url
    recorded = _recorded_steps(local_server["url"], second_url)
    for step in STEPS:
        assert step in recorded, f"the server has no step {step} for {second_url}: {sorted(recorded)}"
    for step in CACHED_ON_RERUN:
        assert recorded[step][0] == "cached", (step, recorded[step])
    assert recorded["train_alignment"][0] == "completed", recorded["train_alignment"]
    for step, outputs in CORE_OUTPUTS.items():
        assert outputs <= recorded[step][1], (step, recorded[step][1])
    summary = parse_summary(second_output)
    print(f"[dashboard test] summary: {summary}")
    named = check_summary(summary, local_server["url"], second_url, recorded)
    # The eval report's view shows the win rate the summary printed (both 3 decimals).
    texts = {"eval_report": f"{summary['win_rate']:.3f}"}
    check_dashboard(local_server["url"], second_url, chromium_path, recorded, named, texts)


def _check_preview(page, kind: str, text: str | None = None) -> None:
    """The artifact sheet's loaded visualization shows what its type promises (and an HTML view `text`)."""
    from playwright.sync_api import expect

    sheet = page.get_by_role("dialog")
    if kind == "image":
        expect(sheet.locator('img[src^="data:image/png"]').first).to_be_visible()
    if kind == "html":
        expect(sheet.locator("iframe").first).to_be_visible()
        body = sheet.frame_locator("iframe").first.locator("body")
        expect(body).to_have_text(re.compile(r"\w{3}"))
        if text:  # (a JSON view shows the unrounded number)
            expect(body).to_contain_text(text)
    # JSON, markdown, CSV: the preview replaced its button (it loaded) and shows some text.
    expect(sheet.get_by_role("button", name="Load Preview")).to_have_count(0)
    expect(sheet).to_contain_text(re.compile(r"\w{3}"))


def _choose_visualization(page, label: str) -> None:
    """An artifact with several visualizations (the eval report: HTML table and JSON) has a chooser
    listing them by file name; each one is loaded on its own."""
    page.get_by_role("dialog").get_by_label("Choose visualization").click()
    page.get_by_role("option", name=label).click()
    page.get_by_role("dialog").get_by_role("button", name="Load Preview").click()


def check_dashboard(
    base_url: str,
    run_url: str,
    chromium_path: str,
    recorded: dict[str, tuple[str, set[str]]],
    named: dict[str, list[tuple[str, str | None]]] | None = None,
    texts: dict[str, str] | None = None,
) -> None:
    """Drive the dashboard of a running server. `run_url` is a run whose load_preferences
    step was cached and whose train_alignment ran; `recorded` is its steps (_recorded_steps);
    `named` the artifacts the run's summary names, with their visualizations (check_summary);
    `texts` what an artifact's preview must show (the summary's win rate in the eval report)."""
    texts = texts or {}
    named = dict(named or {})
    producers = {output: step for step, (_status, outputs) in recorded.items() for output in outputs}
    # Whatever the summary names, plus the HTML reports wherever the pipeline made them.
    for report in HTML_REPORTS & set(producers):
        named.setdefault(report, [("html", None)])
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOT_DIR.glob("*.png"):
        old.unlink()

    with sync_playwright() as pw:
        # --disable-3d-apis: the first-visit survey page animates a WebGL background;
        # under software GL on a busy 2-core box it starves the page's main thread.
        browser = pw.chromium.launch(executable_path=chromium_path, args=["--disable-3d-apis"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            # Offline: avatars, changelog and template thumbnails come from the internet;
            # refuse them at once instead of letting each request hang.
            page.route(
                "**/*", lambda route: route.continue_() if route.request.url.startswith(base_url) else route.abort()
            )

            _open_dashboard(page, base_url)
            page.screenshot(path=str(SCREENSHOT_DIR / "01_home.png"))

            page.goto(run_url)
            expect(page.get_by_text(re.compile(r"#\d+-dpo_sdxl-")).first).to_be_visible()
            # Every step and every output artifact the server recorded is a node of the DAG.
            # The DAG is laid out client side; on 2 busy cores this takes tens of seconds.
            expect(page.get_by_test_id(f"rf__node-step/{STEPS[0]}")).to_be_visible(timeout=120_000)
            for step, (_status, outputs) in recorded.items():
                expect(page.get_by_test_id(f"rf__node-step/{step}")).to_be_visible()
                for output in outputs:
                    expect(_artifact_node(page, step, output)).to_be_visible()
            page.screenshot(path=str(SCREENSHOT_DIR / "02_run_dag.png"))

            page.get_by_test_id("rf__node-step/load_preferences").get_by_role("button", name="load_preferences").click()
            sheet = page.get_by_role("dialog")
            expect(sheet.get_by_role("heading", name="load_preferences")).to_be_visible()
            expect(sheet.get_by_text("Cache key")).to_be_visible()
            expect(_detail(sheet, "Status")).to_have_text(re.compile(r"^\s*cached\s*$", re.IGNORECASE))
            page.screenshot(path=str(SCREENSHOT_DIR / "03_cached_step.png"))
            _close_sheet(page)

            # train_alignment ran again (beta changed): the dashboard must not call it cached.
            page.get_by_test_id("rf__node-step/train_alignment").get_by_role("button", name="train_alignment").click()
            sheet = page.get_by_role("dialog")
            expect(sheet.get_by_role("heading", name="train_alignment")).to_be_visible()
            expect(_detail(sheet, "Status")).to_have_text(re.compile(r"^\s*Completed\s*$", re.IGNORECASE))
            _close_sheet(page)

            _preview_artifact(page, "evaluate_alignment", "sample_grid")
            _check_preview(page, "image")
            page.screenshot(path=str(SCREENSHOT_DIR / "04_sample_grid.png"))
            shots = ["01_home", "02_run_dag", "03_cached_step", "04_sample_grid"]
            named.pop("sample_grid", None)

            # The reports the summary names (eval report, drift, validation, ...) and the HTML
            # reports open from their DAG node; an artifact without a visualization has no preview.
            for name, visualizations in sorted(named.items()):
                if not visualizations:
                    continue
                _close_sheet(page)
                _preview_artifact(page, producers[name], name)
                for index, (kind, label) in enumerate(visualizations):
                    if index:
                        _choose_visualization(page, label)
                    _check_preview(page, kind, texts.get(name))
                    shots.append(f"05_{name}" + (f"_{index + 1}" if index else ""))
                    page.screenshot(path=str(SCREENSHOT_DIR / f"{shots[-1]}.png"))
        except Exception:
            # What the browser showed when it failed, for the person reading the error.
            page.screenshot(path=str(SCREENSHOT_DIR / "failure.png"))
            print(f"[dashboard test] failed at {page.url}; screenshot {SCREENSHOT_DIR / 'failure.png'}")
            raise
        finally:
            browser.close()

    for shot in shots:
        assert (SCREENSHOT_DIR / f"{shot}.png").stat().st_size > 10_000, shot
