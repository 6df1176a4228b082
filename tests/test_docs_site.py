"""The docs site builds with ``mkdocs build --strict`` and renders in a real browser, offline.

One build per module (into a temporary folder), served from a localhost ``http.server`` thread,
opened in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).
Every host except 127.0.0.1 resolves to nothing, so a page that still fetched KaTeX, Mermaid or a
font from a CDN would log a console error and fail. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _require_browser() -> None:
    """Skip where the browser stack is missing, except in CI, where .ci/run installs it: fail there."""
    missing = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not ok]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        msg = "docs browser test needs " + ", ".join(missing) + " (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def test_build_has_every_page(site: Path) -> None:
    for page in ("index.html", "getting-started/index.html", "tutorials/topk/index.html",
                 "tutorials/routing/index.html", "tutorials/grouped-gemm/index.html",
                 "tutorials/backward/index.html", "tutorials/moe-layer/index.html",
                 "reading-cute-dsl/index.html", "benchmarks/index.html", "cli/index.html", "course/topk/index.html",
                 "api/index.html", "course/index.html", "hopper-primer/index.html", "notation/index.html"):
        assert (site / page).is_file(), page
    # Snippet section markers must never leak into a page (the API page shows whole source files,
    # markers included, on purpose), and the vendored assets must be there.
    for html in site.rglob("*.html"):
        if html.parent.name == "api":
            continue
        assert "--8&lt;--" not in html.read_text() and "--8<--" not in html.read_text(), html
    for asset in ("assets/katex/katex.min.js", "assets/katex/katex.min.css",
                  "assets/katex/fonts/KaTeX_Main-Regular.woff2", "assets/mermaid/mermaid.min.js"):
        assert (site / asset).is_file(), asset
    assert not list(site.rglob("*.py")), "generator scripts must not be published"
    # The raw results the Benchmarks page links, byte for byte.
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        assert (site / "benchmarks" / "raw" / path.name).read_bytes() == path.read_bytes(), path.name


def test_nav_lists_the_primer_before_the_chapters_and_the_notation(site: Path) -> None:
    home = (site / "index.html").read_text()
    nav = [home.find(f'href="{href}"') for href in ("notation/", "hopper-primer/", "tutorials/topk/")]
    assert all(i >= 0 for i in nav), nav
    assert nav[1] < nav[2], "the Hopper primer must come before the first chapter"


def test_pages_pull_code_from_the_sources(site: Path) -> None:
    topk = (site / "tutorials/topk/index.html").read_text()
    assert "_radix_select_columns" in topk  # from sonic_learn/reference/topk.py:radix_topk
    assert "stable-sort oracle" in topk  # from tutorials/01_topk.py:check
    api = (site / "api/index.html").read_text()
    for name in ("radix_topk", "token_rounding", "gather_fused_grouped_gemm", "moe_forward"):
        assert name in api, name


@pytest.fixture(scope="module")
def server(site: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))

    class Quiet(handler.func):  # type: ignore[misc,name-defined]
        def log_message(self, *args):  # keep pytest output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1600",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                # Offline: nothing but the local server resolves.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(browser, url: str):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")  # drop messages of earlier pages
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # KaTeX runs on Material's document$ event; wait for it to have typeset every formula.
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.arithmatex').length > 0 && "
        "document.querySelectorAll('.arithmatex:not([data-katex-done])').length === 0"))


def _errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _count(browser, selector: str) -> int:
    return browser.execute_script(f"return document.querySelectorAll({selector!r}).length")


def _mermaid_svgs(browser) -> list:
    """Diagrams Mermaid has drawn. Material renders each into a (closed) shadow root of a
    ``div.mermaid`` that replaces the source ``pre.mermaid``; chromedriver can still look inside."""
    from selenium.common.exceptions import NoSuchShadowRootException
    from selenium.webdriver.common.by import By

    drawn = []
    for block in browser.find_elements(By.CSS_SELECTOR, "div.mermaid"):
        try:
            svgs = block.shadow_root.find_elements(By.CSS_SELECTOR, "svg")
        except NoSuchShadowRootException:
            continue
        if svgs and block.size["height"] > 20:
            drawn.append(block)
    return drawn


def test_home_page_renders(browser, server) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server + "/")
    assert _count(browser, ".katex") > 0, "no KaTeX output: the math was not typeset"
    assert _count(browser, ".katex-error") == 0
    # Mermaid replaces the diagram's source with an <svg> inside the .mermaid block.
    diagrams = WebDriverWait(browser, 30).until(_mermaid_svgs)
    assert _count(browser, "pre.mermaid") == 0, "a Mermaid source block was left undrawn"
    assert _count(browser, ".tabbed-set") > 0, "no content tabs"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-home.png"))
    diagrams[0].screenshot(str(ARTIFACTS / "docs-home-mermaid.png"))
    assert _errors(browser) == []


def test_tutorial_page_renders(browser, server) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server + "/tutorials/topk/")
    assert _count(browser, ".katex") > 0
    assert _count(browser, ".katex-error") == 0
    assert _count(browser, ".katex-display") > 0, "no display math"
    assert _count(browser, ".tabbed-set") > 0
    assert _count(browser, "img[src*='bitonic_network.png']") == 1
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const i = document.querySelector(\"img[src*='bitonic_network.png']\"); return i && i.complete && i.naturalWidth > 0"))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-tutorial-topk.png"))
    assert _errors(browser) == []


def test_grouped_gemm_diagram_renders(browser, server) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server + "/tutorials/grouped-gemm/")
    WebDriverWait(browser, 30).until(_mermaid_svgs)
    assert _count(browser, "pre.mermaid") == 0
    assert _errors(browser) == []


def test_every_page_renders_without_errors(browser, server, site: Path) -> None:
    """Each page of the site: no console error, no formula KaTeX could not typeset, no undrawn diagram."""
    from selenium.webdriver.support.ui import WebDriverWait

    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html")
                   if not p.parent.name.startswith(("assets", "search")))
    assert len(pages) >= 12, pages
    for page in pages:
        url = server + "/" + ("" if page == "." else page + "/")
        browser.get_log("browser")
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(
            "return document.querySelectorAll('.arithmatex:not([data-katex-done])').length === 0"))
        if _count(browser, ".mermaid"):
            WebDriverWait(browser, 30).until(lambda d: _count(d, "pre.mermaid") == 0 and _mermaid_svgs(d))
        assert _count(browser, ".katex-error") == 0, f"{page}: a formula failed to typeset"
        assert _errors(browser) == [], f"{page}: console errors"


def test_results_page_renders(browser, server, site: Path) -> None:
    """The Benchmarks page: figures drawn from benchmarks/results/, each with device and date, and
    links to the raw JSON that the site serves."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server + "/benchmarks/")
    figures = "img[src^='data:image/png']"
    if list((REPO / "benchmarks" / "results").glob("*.json")):
        assert _count(browser, figures) >= 4, "the results figures are missing"
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(
            f"return [...document.querySelectorAll({figures!r})].every(i => i.complete && i.naturalWidth > 300)"))
        assert "Measured on" in browser.find_element(By.TAG_NAME, "article").text
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "a[href$='.json']")]
        assert links, "no link to the raw JSON"
        import json
        import urllib.request

        for link in links:  # each raw file is one click away, and is the committed JSON
            with urllib.request.urlopen(link, timeout=30) as resp:
                json.loads(resp.read())
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-benchmarks.png"))
    assert _errors(browser) == []


def test_executed_tutorial_shows_outputs(browser, server) -> None:
    """A tutorial page shows each cell's output, executed when the site was built."""
    from selenium.webdriver.common.by import By

    _open(browser, server + "/tutorials/topk/")
    blocks = browser.find_elements(By.CSS_SELECTOR, "div.cell-output")
    assert len(blocks) >= 5, len(blocks)
    text = "\n".join(b.text for b in blocks)
    assert "radix_topk: values" in text and "indices" in text  # the first cell's print
    assert "stable-sort oracle" in text  # the check cell's print
    # The measurement cell has a GPU part: it is labelled (a committed GPU run, or the note that none is).
    assert "GPU" in text
    blocks[0].screenshot(str(ARTIFACTS / "docs-tutorial-output.png")) if ARTIFACTS.is_dir() else None
    assert _errors(browser) == []


def test_primer_renders(browser, server) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, server + "/hopper-primer/")
    assert _count(browser, ".katex-display") > 0 and _count(browser, ".katex-error") == 0
    for name in ("memory_hierarchy.png", "roofline.png", "gemm_tiling.png", "warp_specialization.png"):
        WebDriverWait(browser, 30).until(lambda d, n=name: d.execute_script(
            f"const i = document.querySelector(\"img[src*='{n}']\"); return i && i.complete && i.naturalWidth > 0"))
    WebDriverWait(browser, 30).until(_mermaid_svgs)
    assert _count(browser, "pre.mermaid") == 0
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs-primer.png"))
    assert _errors(browser) == []


def test_notation_page_renders(browser, server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get_log("browser")
    browser.get(server + "/notation/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.arithmatex:not([data-katex-done])').length === 0"))
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text.startswith("Notation")
    assert _count(browser, ".katex-error") == 0
    assert _errors(browser) == []
