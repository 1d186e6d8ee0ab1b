"""The dashboard in a real headless Chromium (Debian's chromium, driven by Playwright).

Without Chromium these tests skip locally, but fail when SEQSCOPE_REQUIRE_BROWSER=1
(as .ci/run sets): CI never passes them by skipping.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dash
import pytest

from tests.dashboard_trace import make_trace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"]
SCREENSHOTS = os.environ.get("SEQSCOPE_SCREENSHOTS")


def _require_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package"
    else:
        missing = None if CHROMIUM else "chromium (apt-get install chromium chromium-driver)"
    if missing:
        if os.environ.get("SEQSCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests need {missing}")
        pytest.skip(f"browser tests need {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(path: Path) -> str:
    from seqscope.dashboard import create_app

    app = create_app(str(path))
    port = _free_port()
    threading.Thread(target=lambda: app.run(host="127.0.0.1", port=port, debug=False), daemon=True).start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("dashboard did not start")


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return _serve(make_trace(tmp_path_factory.mktemp("browser") / "t.h5"))


@pytest.fixture
def page(served, browser):  # the app (and dash's imports) first, then Playwright's greenlets
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(served)
    page.wait_for_selector("#gradflow .main-svg", timeout=30_000)
    page.wait_for_function("document.querySelector('#step-label').textContent.startsWith('step 0')")
    yield page
    assert page.errors == [], page.errors
    page.close()


def _title(page, graph: str) -> str:
    return page.locator(f"#{graph} .gtitle").first.text_content()


def _label(page) -> str:
    return page.locator("#step-label").text_content()


def test_page_shows_all_views(page):
    assert "lstm.l0" in _title(page, "gradflow")
    assert "step 0" in _title(page, "propagation")
    for graph in ("overview", "hidden", "cell", "saturation"):
        assert page.locator(f"#{graph} .main-svg").count() > 0, graph
    titles = page.locator("#gates .annotation-text").all_text_contents()  # one figure, a heatmap per gate
    assert [t.split(" gate")[0] for t in titles] == ["input", "forget", "cell", "output"]
    assert page.locator("#gates .heatmaplayer image").count() == 4
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / "dashboard.png"), full_page=True)


def _tick_value(text: str) -> float:
    """A log axis's tick label as plotly.js writes it ("1", "10k", "3,276.247",
    "10\u200b16\u200b", "9x10\u200b21\u200b", "100\u03bc") as a number."""
    t = text.replace(",", "").replace("\u2212", "-")
    power = re.fullmatch(r"(?:(\d+(?:\.\d+)?)x)?10\u200b(-?\d+)\u200b", t)
    if power:
        return float(power.group(1) or 1) * 10.0 ** int(power.group(2))
    plain = re.fullmatch(r"(\d+(?:\.\d+)?)([kMBTm\u03bcunp]?)", t)
    assert plain, f"unexpected tick label {text!r}"
    scale = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12, "m": 1e-3, "\u03bc": 1e-6, "u": 1e-6, "n": 1e-9,
             "p": 1e-12}
    return float(plain.group(1)) * scale[plain.group(2)]


def test_overview_axes_have_round_ticks_in_their_lines_colours(page):
    """Both log axes of the overview are labelled at round values (1, 2 or 5 times a
    power of ten). The gradient norm's axis, which overlays the loss's, took the
    loss axis's tick positions: 3.29246, 32.86504, 328.056 (and in a narrow window
    only each label's last digit showed). Each axis is in its line's colour."""
    for axis in ("ytick", "y2tick"):
        labels = page.locator(f"#overview .{axis} text").all_text_contents()
        assert len(labels) >= 2, (axis, labels)
        for label in labels:
            value = _tick_value(label)
            mantissa = round(value / 10.0 ** math.floor(math.log10(value)), 6)
            assert mantissa in (1, 2, 5), (axis, labels)
    colours = page.evaluate("""() => {
        const fig = document.querySelector('#overview .js-plotly-plot');
        const line = name => fig.data.find(t => t.name === name).line.color;
        return [line('loss'), fig.layout.yaxis.title.font.color,
                line('global gradient norm'), fig.layout.yaxis2.title.font.color];
    }""")
    assert colours[0] == colours[1] and colours[2] == colours[3] and colours[0] != colours[2], colours


def test_slider_moves_every_view(page):
    before = page.locator("#hidden .heatmaplayer").inner_html()
    page.locator("#slider [role=slider]").focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("document.querySelector('#step-label').textContent.startsWith('step 3')")
    page.wait_for_function("document.querySelector('#propagation .gtitle').textContent.includes('step 3')")
    assert page.locator("#hidden .heatmaplayer").inner_html() != before
    # the markers over the overview and the gradient flow follow the slider
    for graph in ("overview", "gradflow"):
        _assert_marker_at(page, graph, 3)


# Where the marker over a graph is (the middle of its box, in page pixels; null when
# hidden), and where Plotly itself draws a vertical line at the given step on that
# graph's x axis: a shape added for the comparison, then taken away again
_MARKER_AND_PLOTLY_LINE = """async ([graph, step]) => {
    const gd = document.querySelector('#' + graph + ' .js-plotly-plot');
    const box = document.getElementById(graph + '-marker');
    const at = box.style.display === 'none' ? null : box.getBoundingClientRect();  // before the relayouts below
    const shapes = (gd.layout.shapes || []).slice();
    await Plotly.relayout(gd, {shapes: shapes.concat([{type: 'line', xref: 'x', x0: step, x1: step,
                                                        yref: 'paper', y0: 0, y1: 1, line: {width: 1}}])});
    const lines = gd.querySelectorAll('.shapelayer path');
    const drawn = lines[lines.length - 1].getBoundingClientRect();
    await Plotly.relayout(gd, {shapes: shapes});
    return {marker: at && (at.left + at.right) / 2, top: at && at.top, height: at && at.height,
            line: (drawn.left + drawn.right) / 2, lineTop: drawn.top, lineHeight: drawn.height};
}"""


def _assert_marker_at(page, graph: str, step: int, wait: bool = True) -> None:
    """The marker over ``graph`` stands where Plotly draws x = ``step``, over the plot's
    whole height, to within 1.5 pixels (within 10 s, or at once)."""
    deadline = time.time() + (10 if wait else 0)
    while True:
        got = page.evaluate(_MARKER_AND_PLOTLY_LINE, [graph, step])
        ok = got["marker"] is not None and abs(got["marker"] - got["line"]) <= 1.5 \
            and abs(got["top"] - got["lineTop"]) <= 1.5 and abs(got["height"] - got["lineHeight"]) <= 1.5
        if ok or time.time() > deadline:
            break
        time.sleep(0.2)
    assert ok, (graph, step, got)


def test_the_step_markers_mark_recorded_step_numbers_and_follow_zoom(browser, tmp_path):
    """The markers over the overview and the gradient flow are drawn in the page,
    not in the figures: a slider move sends neither figure again (each used to be
    redrawn whole to move its marker). They stand at the step's number, not at the
    slider's position (steps 0, 5, 10, ... here), and follow a zoom (hidden while the
    step is outside the shown range, back when it is inside again) and a resize."""
    import torch
    from torch import nn

    import seqscope

    path = tmp_path / "every5.h5"
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8)
    with seqscope.watch(lstm, path, every=5) as scope:
        for step in range(40):
            out, _ = lstm(torch.randn(12, 2, 3))
            loss = out.pow(2).mean()
            loss.backward()
            scope.log(loss=loss)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(_serve(path))
        page.wait_for_selector("#gradflow .main-svg", timeout=30_000)
        for graph in ("overview", "gradflow"):
            _assert_marker_at(page, graph, 0)
        page.locator("#slider [role=slider]").focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        page.wait_for_function("document.querySelector('#step-label').textContent.startsWith('step 15 ')")
        for graph in ("overview", "gradflow"):
            _assert_marker_at(page, graph, 15)
        # zoomed to steps 20-30: step 15 is not shown, and neither is its marker
        page.evaluate("() => Plotly.relayout(document.querySelector('#overview .js-plotly-plot'), "
                      "{'xaxis.range': [20, 30]})")
        page.wait_for_function("document.getElementById('overview-marker').style.display === 'none'")
        page.evaluate("() => Plotly.relayout(document.querySelector('#overview .js-plotly-plot'), "
                      "{'xaxis.range': [10, 30]})")
        _assert_marker_at(page, "overview", 15)
        # a narrower window: the figures are drawn again at their new width, the markers with them
        widths = "() => ['overview', 'gradflow'].map(g => document.querySelector('#' + g + ' .js-plotly-plot')" \
                 "._fullLayout.width)"
        before = page.evaluate(widths)
        page.set_viewport_size({"width": 900, "height": 1800})
        page.wait_for_function(f"({widths})().every((w, i) => w < {before}[i])")
        time.sleep(0.5)
        for graph in ("overview", "gradflow"):
            _assert_marker_at(page, graph, 15, wait=False)
        assert errors == [], errors
    finally:
        page.close()


def test_play_replays_and_pauses(page):
    page.click("#play")
    page.wait_for_function("!document.querySelector('#step-label').textContent.startsWith('step 0')",
                           timeout=10_000)
    page.click("#play")
    page.wait_for_function("document.querySelector('#play').textContent.includes('play')")
    time.sleep(1.5)
    paused = _label(page)
    time.sleep(1.5)
    assert _label(page) == paused


def test_clicking_a_finding_goes_to_it(page):
    page.wait_for_selector("button.finding", timeout=30_000)
    target = page.locator("button.finding", has_text="exploding_gradient").first
    text = target.text_content()
    assert "step" in text
    target.click()
    page.wait_for_function("document.querySelector('#step-label').textContent.startsWith('step 12')")
    layer = page.locator("#layer").text_content()
    assert layer.strip() in text


def test_switching_layers(page):
    page.click("#layer")
    _menu_options(page, "layer").filter(has_text=re.compile(r"^lstm\.l1$")).first.click()
    page.wait_for_function("document.querySelector('#gradflow .gtitle').textContent.includes('lstm.l1')")
    # the state views follow in their own callback
    page.wait_for_function("document.querySelector('#hidden .gtitle').textContent.includes('lstm.l1')")
    assert "lstm.l1" in _title(page, "propagation")


WRITER = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    import seqscope
    lstm = nn.LSTM(3, 8)
    with seqscope.watch(lstm, sys.argv[1], every=1) as scope:
        for step in range(40):
            out, _ = lstm(torch.randn(10, 2, 3))
            out.sum().backward()
            scope.log(loss=float(step))
            if step == 3:
                print("ready", flush=True)
            time.sleep(0.25)
""")


def test_live_trace_grows_without_restart(served, browser, tmp_path):
    path = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        url = _serve(path)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#slider [role=slider]", timeout=30_000)
        first = int(page.locator("#slider [role=slider]").get_attribute("aria-valuemax"))
        page.wait_for_function(
            f"Number(document.querySelector('#slider [role=slider]').getAttribute('aria-valuemax')) > {first + 2}",
            timeout=20_000)
        page.close()
    finally:
        proc.kill()
        proc.wait()


RUN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import seqscope
    path, kind, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](3, 8)
    with seqscope.watch(model, path, every=1, sequences=batch) as scope:
        print("open", flush=True)
        sys.stdin.readline()
        for step in range(steps):
            out, _ = model(torch.randn(10, batch, 3))
            out.sum().backward()
            scope.log(loss=float(step))
    print("done", flush=True)
""")


def _menu_options(page, dropdown: str):
    """The options of the open menu of the dropdown ``dropdown`` (an id): role
    "option" from Dash 3's dropdown on. Dash 2's (react-virtualized-select, within
    dash>=2.16) gives them a class instead, and role "option" to each dropdown's
    shown value."""
    if int(dash.__version__.split(".")[0]) < 3:
        return page.locator(f"#{dropdown} .VirtualizedSelectOption")
    return page.get_by_role("option")


def _sequence_menu(page) -> list[str]:
    page.click("#sequence")
    options = _menu_options(page, "sequence").all_text_contents()
    page.keyboard.press("Escape")
    return options


def test_the_page_follows_a_trace_from_its_start_and_a_new_run_on_its_path(browser, tmp_path):
    """A dashboard opened before the first record: the layer and sequence menus
    used to stay empty (and the layer view's callback failed). Then the next run is
    started on the same path while the page is open: it used to stop at watch()
    (the dashboard held the file's lock); now the page moves to it, with its own
    layers, steps and sequences."""
    path = tmp_path / "runs.h5"
    first = subprocess.Popen([sys.executable, "-c", RUN, str(path), "lstm", "4", "2"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    page = None
    try:
        assert first.stdout.readline().strip() == "open"
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(_serve(path))
        page.wait_for_function("document.querySelector('#step-label')?.textContent === 'no steps'", timeout=30_000)
        # an empty trace is not called healthy
        page.wait_for_function("document.querySelector('#findings')?.textContent?.includes("
                               "'holds no recorded training steps')", timeout=30_000)
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "done"
        page.wait_for_function("document.querySelector('#step-label')?.textContent?.includes('(1 of 4)')",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#gradflow .gtitle')?.textContent?.includes('lstm.l0')")
        assert "lstm.l0" in page.locator("#layer").text_content()
        assert _sequence_menu(page) == ["0", "1"]
        page.wait_for_function("!document.querySelector('#findings')?.textContent?.includes('no recorded training')",
                               timeout=30_000)
        page.locator("#slider [role=slider]").focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function("document.querySelector('#step-label')?.textContent?.startsWith('step 1')")

        second = subprocess.run([sys.executable, "-c", RUN, str(path), "gru", "3", "3"], input="\n",
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0 and second.stdout.split() == ["open", "done"], second.stderr
        page.wait_for_function("document.querySelector('#step-label')?.textContent?.startsWith('step 0  (1 of 3)')",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#gradflow .gtitle')?.textContent?.includes('gru.l0')")
        page.wait_for_function("document.querySelector('#hidden .gtitle')?.textContent?.includes('gru.l0')")
        assert "gru.l0" in page.locator("#layer").text_content()
        assert _sequence_menu(page) == ["0", "1", "2"]
        assert errors == [], errors
    finally:
        first.kill()
        first.wait()
        if page is not None:
            page.close()
