"""Take the README's screenshots from the real app in headless Chromium.

    python docs/screenshots.py   # records two example runs, writes docs/images/*.png
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def serve(path: Path) -> str:
    from seqscope.dashboard import create_app

    app = create_app(str(path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threading.Thread(target=lambda: app.run(host="127.0.0.1", port=port, debug=False), daemon=True).start()
    time.sleep(2)
    return f"http://127.0.0.1:{port}/"


def shoot(page, url: str, out: Path, clips: dict[str, str], step_index: int = 0) -> None:
    page.goto(url)
    page.wait_for_selector("#gradflow .main-svg", timeout=60_000)
    page.wait_for_selector("button.finding, #no-findings", timeout=60_000)
    if step_index:
        page.locator("#slider [role=slider]").focus()
        for _ in range(step_index):
            page.keyboard.press("ArrowRight")
    time.sleep(3)
    page.screenshot(path=str(out / "full.png"), full_page=True)
    for name, selector in clips.items():
        page.locator(selector).first.screenshot(path=str(out / f"{name}.png"))


def main() -> None:
    from playwright.sync_api import sync_playwright

    import examples.exploding_rnn as exploding
    from seqscope import demo

    tmp = Path(tempfile.mkdtemp())
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    demo_trace = demo.run(tmp / "demo.h5")
    exploding_trace = exploding.main(["--out", str(tmp / "exploding.h5")])
    chromium = shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        out = tmp / "demo"
        out.mkdir()
        shoot(page, serve(demo_trace), out, {"gates": "#gates", "states": "#hidden"}, step_index=30)
        shutil.copy(out / "full.png", images / "dashboard-demo.png")
        shutil.copy(out / "gates.png", images / "gates.png")
        out = tmp / "exploding"
        out.mkdir()
        shoot(page, serve(Path(exploding_trace)), out, {"overview": "#overview", "gradflow": "#gradflow",
                                                         "findings": "#findings"}, step_index=3)
        shutil.copy(out / "full.png", images / "dashboard-exploding.png")
        for name in ("overview", "gradflow", "findings"):
            shutil.copy(out / f"{name}.png", images / f"{name}.png")
        browser.close()
    print(f"screenshots written to {images}")


if __name__ == "__main__":
    main()
