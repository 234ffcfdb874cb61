"""End to end in a real headless browser (Debian's chromium driven by Playwright): label three
queried pixels by clicks and keys, undo one, reload, and find exactly two answers on disk; pick
classes from 10 on by typing two digits quickly, and keep one key per class in a set of ten."""

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from conftest import human_config

from al.annotate.app import create_app
from al.annotate.session import AnnotationSession
from al.experiment import run_dir, run_experiment
from al.oracles import AwaitingAnnotations

pytestmark = pytest.mark.slow  # starts a server and a browser: seconds

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HOW_TO_GET_IT = ("the browser test needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`, "
                 "which .ci/run does) and the playwright package (`make test` installs it)")
# Flags that keep Chromium off this machine's closed network and working as root in a sandbox.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        if os.environ.get("GUIDEDGEN_REQUIRE_BROWSER") == "1":
            pytest.fail(HOW_TO_GET_IT)
        pytest.skip(HOW_TO_GET_IT)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _serving(run):
    app = create_app(AnnotationSession(run), "browser-token")
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "the annotation server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/?token=browser-token"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(waiting_run):
    with _serving(waiting_run) as url:
        yield url


@contextlib.contextmanager
def _page(url):
    """A page of the annotation app, loaded (skips when the browser is unavailable)."""
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            yield page
        finally:
            browser.close()


def _selected(page) -> int:
    return int(page.locator("#palette button.selected").get_attribute("data-class-id"))


def test_label_three_undo_one_reload(server, waiting_run, tmp_path):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(server)
            page.wait_for_selector("body[data-ready=true]")
            counts = page.locator("#counts")
            assert counts.inner_text() == "0 / 8 answered"
            # 1: pick class 2 with a click, click the first pending marker
            page.click("#palette button[data-class-id='2']")
            first = page.locator(".marker:not(.answered)").first
            first_pixel = (int(first.get_attribute("data-row")), int(first.get_attribute("data-col")))
            first.click()
            page.wait_for_function("document.querySelector('#counts').textContent.startsWith('1 /')")
            # 2: number key 5, Enter labels the highlighted marker
            page.keyboard.press("5")
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelector('#counts').textContent.startsWith('2 /')")
            # 3: "unsure", then undo it
            page.keyboard.press("u")
            page.wait_for_function("document.querySelector('#counts').textContent.startsWith('3 /')")
            page.keyboard.press("z")
            page.wait_for_function("document.querySelector('#counts').textContent.startsWith('2 /')")
            page.reload()
            page.wait_for_selector("body[data-ready=true]")
            assert counts.inner_text() == "2 / 8 answered"
            page.screenshot(path=str(tmp_path / "annotate.png"))
        finally:
            browser.close()
    assert (tmp_path / "annotate.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copy(tmp_path / "annotate.png", Path(__file__).parents[1] / "docs" / "annotate.png")
    session = AnnotationSession(waiting_run)
    answers = {(i, p): c for i in session.shapes for p, c in session.labels.pixels(i).items()}
    assert len(answers) == 2 and sorted(answers.values()) == [2, 5]
    assert any(pixel == first_pixel and cls == 2 for (_, pixel), cls in answers.items())


def test_classes_from_ten_on_are_picked_by_typing_their_digits_quickly(server, waiting_run):
    """DigitScenes with all ten digits has 11 classes: "1" then "0" within 0.6 s is class 10."""
    with _page(server) as page:
        assert page.locator("#palette button").count() == 11
        assert page.locator("#palette button[data-class-id='10'] kbd").inner_text() == "10"
        assert page.locator("#help-digits").is_visible()
        page.keyboard.press("1")
        assert _selected(page) == 1  # a digit picks its class at once
        page.keyboard.press("0")
        assert _selected(page) == 10
        page.keyboard.press("7")  # no class 107: a new id
        assert _selected(page) == 7
        page.keyboard.press("1")
        page.wait_for_timeout(700)  # too slow for one id
        page.keyboard.press("0")
        assert _selected(page) == 0
        page.keyboard.press("1")
        page.keyboard.press("0")
        page.keyboard.press("Enter")  # answers class 10
        page.wait_for_function("document.querySelector('#counts').textContent.startsWith('1 /')")
        page.keyboard.press("1")
        page.keyboard.press("Enter")  # answers class 1; the next digit starts a new id
        page.keyboard.press("0")
        assert _selected(page) == 0
        page.wait_for_function("document.querySelector('#counts').textContent.startsWith('2 /')")
    session = AnnotationSession(waiting_run)
    answers = [c for i in session.shapes for c in session.labels.pixels(i).values()]
    assert sorted(answers) == [1, 10]


@pytest.fixture
def ten_class_run(tmp_path):
    """A human-mode run waiting for answers, on DigitScenes with nine digits: ten classes."""
    config = human_config(tmp_path, **{"data.digits": "[0,1,2,3,4,5,6,7,8]"})
    with pytest.raises(AwaitingAnnotations):
        run_experiment(config)
    return run_dir(tmp_path, "entropy", 0)


def test_ten_classes_keep_one_key_per_class(ten_class_run):
    with _serving(ten_class_run) as url, _page(url) as page:
        assert page.locator("#palette button").count() == 10
        assert not page.locator("#help-digits").is_visible()
        page.keyboard.press("1")
        page.keyboard.press("2")  # quickly, but there is no class 12
        assert _selected(page) == 2
        page.keyboard.press("1")
        page.keyboard.press("0")
        assert _selected(page) == 0
        page.keyboard.press("9")
        assert _selected(page) == 9
