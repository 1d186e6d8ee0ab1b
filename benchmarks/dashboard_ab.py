"""The dashboard's slider in a real browser, before and after a change, side by side:
the dashboard of an earlier git revision (``--before``) and of the working tree,
each served by its own process on the same trace, driven by one headless
Chromium. Pages take turns in blocks of moves (the order alternates by round),
so that the machine's drift falls on both alike; each move is one key press on
the slider, timed until the page shows the new step (label and propagation
figure drawn), as part 4 of run.py times it.

Only ``dashboard/`` comes from the earlier revision: both servers read the trace
with the working tree's ``seqscope``. Where the earlier revision's pyproject.toml
does not list orjson, its server encodes with the json module (as it did then).

    python benchmarks/dashboard_ab.py --before 218da22 [--trace big.h5] [--gib 1] [--rounds 10] [--moves 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import make_big_trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# A server for one tree's dashboard/: the package seqscope.dashboard is made from
# that directory's files (data, figures, app) before anything imports it.
SERVE = """
import importlib.util, logging, os, sys, types
tree, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
import seqscope
pkg = types.ModuleType("seqscope.dashboard")
pkg.__path__ = [os.path.join(tree, "dashboard")]
sys.modules["seqscope.dashboard"] = pkg
seqscope.dashboard = pkg
for name in ("data", "figures", "app"):
    spec = importlib.util.spec_from_file_location("seqscope.dashboard." + name, os.path.join(tree, "dashboard", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(pkg, name, module)
if os.environ.get("SEQSCOPE_AB_ENGINE"):
    import plotly.io as pio
    pio.json.config.default_engine = os.environ["SEQSCOPE_AB_ENGINE"]
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = pkg.app.create_app(path)
print("serving", flush=True)
app.run(host="127.0.0.1", port=port, debug=False)
"""

SHOWN = ("(n) => document.querySelector('#step-label').textContent.startsWith('step ' + n + ' ')"
         " && document.querySelector('#propagation .gtitle').textContent.includes('step ' + n)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision whose dashboard/ is 'before'")
    parser.add_argument("--trace", default=None, help="trace to serve (generated if missing)")
    parser.add_argument("--gib", type=float, default=1.0, help="size of a generated trace")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--moves", type=int, default=6, help="moves per page and round")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("dashboard_ab: no Chromium on this machine")
    from playwright.sync_api import sync_playwright

    scratch = Path(tempfile.mkdtemp(prefix="seqscope-ab-"))
    procs: list[subprocess.Popen[str]] = []
    worktree = scratch / "before"
    try:
        trace = Path(args.trace) if args.trace else scratch / "big.h5"
        if not trace.exists():
            steps = make_big_trace(str(trace), int(args.gib * 2**30))
            print(f"generated {trace} ({trace.stat().st_size / 2**30:.2f} GiB, {steps} steps)", flush=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree), args.before],
                       check=True)
        old_orjson = "orjson" in (worktree / "pyproject.toml").read_text()
        ports = {"before": _free_port(), "after": _free_port()}
        for side, tree in (("before", worktree), ("after", ROOT)):
            env = dict(os.environ)
            if side == "before" and not old_orjson:
                env["SEQSCOPE_AB_ENGINE"] = "json"
            proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tree), str(trace), str(ports[side])],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
            procs.append(proc)
            if proc.stdout is None or proc.stdout.readline().strip() != "serving":
                sys.exit(f"dashboard_ab: the {side} server did not start")
        times: dict[str, list[float]] = {"before": [], "after": []}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"])
            pages: dict[str, dict[str, Any]] = {}
            for side, port in ports.items():
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                for _ in range(100):
                    try:
                        page.goto(f"http://127.0.0.1:{port}/")
                        break
                    except Exception:  # noqa: BLE001 - the server is still starting
                        time.sleep(0.2)
                page.wait_for_selector("#propagation .gtitle", timeout=60_000)
                pages[side] = {"page": page, "index": 0, "dir": 1}
            n_steps = int(pages["before"]["page"].locator("#slider [role=slider]").get_attribute("aria-valuemax")) + 1
            for r in range(args.rounds):
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    st = pages[side]
                    page = st["page"]
                    page.bring_to_front()
                    page.locator("#slider [role=slider]").focus()
                    time.sleep(0.3)
                    for _ in range(args.moves):
                        if not 0 <= st["index"] + st["dir"] < n_steps:
                            st["dir"] = -st["dir"]  # back and forth over the recorded steps
                        st["index"] += st["dir"]
                        t0 = time.perf_counter()
                        page.keyboard.press("ArrowRight" if st["dir"] > 0 else "ArrowLeft")
                        page.wait_for_function(SHOWN, arg=st["index"], polling="raf", timeout=30_000)
                        times[side].append(time.perf_counter() - t0)
                        time.sleep(0.15)
            browser.close()
        print("| dashboard | moves | median | 95th percentile |\n|---|---|---|---|")
        for side, label in (("before", f"before ({args.before})"), ("after", "after (working tree)")):
            t = sorted(times[side])
            print(f"| {label} | {len(t)} | {statistics.median(t) * 1e3:.0f} ms | "
                  f"{t[int(0.95 * (len(t) - 1))] * 1e3:.0f} ms |")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
