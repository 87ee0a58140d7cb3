"""The chat page of `kataru serve` in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
by selenium) against a live server on the embedded model: streaming, Stop, conversations that survive a
reload, settings that reach the engine, IME composition, escaping of a model's HTML, the API key, and a
screenshot with Japanese glyphs (set KATARU_SCREENSHOT=PATH to keep it: the README's comes from this test)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import KEY, Threaded

import kataru

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra: scripts/setup.sh test")
if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip("no headless browser: apt-get install chromium chromium-driver fonts-noto-cjk (scripts/test.sh "
                "does it where it may)", allow_module_level=True)
if not (ROOT / "kataru" / "models" / "kataru-tiny-ja").is_dir():
    pytest.skip("no embedded model", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


class Spy:
    """Records the sampling of every request the engine receives; `long` makes replies ignore eos, so that the
    embedded model (whose answers are short) keeps writing long enough to be watched and stopped; `grammar`
    constrains what the model writes (a reply made of HTML)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.received, self.long, self.grammar = engine, [], False, None
        self.submit = engine.submit
        engine.submit = self

    def __call__(self, prompt: list[int], params: Any) -> Any:
        self.received.append(params)
        if self.long:
            params = dataclasses.replace(params, ignore_eos=True, max_new_tokens=2000)
        if self.grammar:
            params = dataclasses.replace(params, grammar=self.grammar, max_new_tokens=200)
        return self.submit(prompt, params)


@pytest.fixture(scope="module")
def server() -> Iterator[Threaded]:
    live = Threaded(lambda: kataru.load(progress=False), served_model_name="kataru-tiny-ja")
    yield live
    live.stop()


def browser() -> Any:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800",
                 "--lang=ja", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture()
def page(server: Threaded) -> Iterator[Any]:
    driver = browser()
    driver.get(server.base + "/")
    wait(lambda: driver.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model's name")
    driver.expected = "\0"  # a test that provokes an error names what the browser will log for it
    yield driver
    logs = [entry for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and driver.expected not in entry["message"]]
    driver.quit()
    assert not logs, f"the page logged errors: {logs}"


def wait(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def replies(driver: Any) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant .body")]


def generating(driver: Any) -> bool:
    return driver.find_element(By.ID, "stop-button").is_displayed()


def ask(driver: Any, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_page_is_served_with_a_strict_policy_and_the_api_answers_it(server: Threaded) -> None:
    response = httpx.get(server.base + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    nonce = policy.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in response.text and "{{nonce}}" not in response.text
    assert "unsafe-inline" not in policy and "connect-src 'self'" in policy
    assert httpx.get(server.base + "/").headers["content-security-policy"] != policy  # a fresh nonce each time
    script = httpx.get(server.base + "/page/markdown-it.min.js")
    assert script.status_code == 200 and "markdownit" in script.text


def test_streams_stops_keeps_conversations_and_sends_the_settings(server: Threaded, page: Any) -> None:
    spy = Spy(server.server.llm.engine)
    try:
        spy.long = True
        ask(page, "日本の首都はどこですか")
        lengths = set()
        wait(lambda: len(replies(page)) == 1 and (lengths.add(len(replies(page)[0])) or len(lengths) >= 5),
             "a reply growing token by token")
        assert generating(page)
        engine = server.server.llm.engine
        assert engine.stats()["running"] == 1
        page.find_element(By.ID, "stop-button").click()
        wait(lambda: engine.stats()["running"] == 0 and not engine.has_work(), "the engine to drop the request", 10)
        wait(lambda: not generating(page), "the Send button back")
        metrics = httpx.get(server.base + "/metrics").text
        assert "kataru:num_requests_running 0.0" in metrics
        assert 'finished_reason="abort"' in metrics or 'finished_reason="cancelled"' in metrics
        stopped = page.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .stats").text
        assert "停止" in stopped
        answer = replies(page)[0]
        assert answer

        page.refresh()  # the conversation survives a reload
        wait(lambda: page.find_elements(By.CSS_SELECTOR, "#conversations li"), "the conversation list")
        titles = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#conversations li .title")]
        assert titles == ["日本の首都はどこですか"]
        assert replies(page)[0][:20] == answer[:20]

        spy.long = False
        page.find_element(By.ID, "new-chat").click()  # a second conversation, at another temperature
        page.find_element(By.ID, "toggle-settings").click()
        temperature = page.find_element(By.ID, "temperature")
        assert float(temperature.get_attribute("value")) == 0.7  # the embedded model's card
        temperature.clear()
        temperature.send_keys("0.3")
        seed = page.find_element(By.ID, "seed")
        seed.send_keys("7")
        ask(page, "こんにちは")
        wait(lambda: not generating(page) and replies(page), "the second reply")
        assert spy.received[-1].temperature == pytest.approx(0.3) and spy.received[-1].seed == 7
        assert spy.received[-1].top_p == pytest.approx(0.95)  # the rest as the card says
        assert len(page.find_elements(By.CSS_SELECTOR, "#conversations li")) == 2
        stats = page.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .stats").text
        assert "tok/s" in stats and "トークン" in stats

        page.refresh()  # the settings were kept for this model
        page.find_element(By.ID, "toggle-settings").click()
        assert page.find_element(By.ID, "temperature").get_attribute("value") == "0.3"
    finally:
        server.server.llm.engine.submit = spy.submit


def test_regenerate_edit_rename_delete_and_english(server: Threaded, page: Any) -> None:
    page.execute_script("localStorage.clear()")
    page.refresh()
    wait(lambda: page.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model's name")
    ask(page, "一つ目の質問")
    wait(lambda: not generating(page) and replies(page), "the reply")
    page.find_element(By.CSS_SELECTOR, ".msg.assistant button.regenerate").click()
    wait(lambda: not generating(page) and len(replies(page)) == 1 and
         page.find_elements(By.CSS_SELECTOR, ".msg.assistant button.regenerate"), "a regenerated reply")
    page.find_element(By.CSS_SELECTOR, ".msg.user button.edit").click()
    assert page.find_element(By.ID, "input").get_attribute("value") == "一つ目の質問"
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    box = page.find_element(By.ID, "input")
    box.send_keys("、直しました")
    box.send_keys(Keys.ENTER)
    wait(lambda: not generating(page) and replies(page), "the reply to the edited question")
    users = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#messages .msg.user .body")]
    assert users == ["一つ目の質問、直しました"]

    page.find_element(By.CSS_SELECTOR, "#conversations li.current button.rename").click()
    field = page.find_element(By.CSS_SELECTOR, "#conversations li input")
    field.send_keys(Keys.CONTROL, "a")  # (WebDriver's clear() would blur the field, which saves the name)
    field.send_keys("名前を変えた会話", Keys.ENTER)
    wait(lambda: [e.text for e in page.find_elements(By.CSS_SELECTOR, "#conversations .title")] == ["名前を変えた会話"],
         "the new name")
    page.find_element(By.ID, "lang").click()
    assert page.find_element(By.ID, "send").text == "Send"
    assert page.find_element(By.CSS_SELECTOR, "#conversations li.current button.delete").text == "Delete"
    page.find_element(By.CSS_SELECTOR, "#conversations li.current button.delete").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#conversations li")
    page.refresh()
    assert page.find_element(By.ID, "send").text == "Send"  # the language is kept
    assert not page.find_elements(By.CSS_SELECTOR, "#conversations li")
    page.find_element(By.ID, "lang").click()


def test_enter_inside_an_ime_composition_never_sends(server: Threaded, page: Any) -> None:
    spy = Spy(server.server.llm.engine)
    try:
        page.execute_script("document.getElementById('input').value = 'にほんご'")
        fire = """
            const box = document.getElementById('input');
            box.dispatchEvent(new CompositionEvent(arguments[0], {bubbles: true, data: 'にほんご'}));"""
        key = """
            const box = document.getElementById('input');
            box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', code: 'Enter', keyCode: arguments[1],
                              isComposing: arguments[0], bubbles: true, cancelable: true}));"""
        page.execute_script(fire, "compositionstart")
        page.execute_script(key, True, 13)  # Enter confirming the conversion
        page.execute_script(key, False, 229)  # what Chrome and Safari send for keys the IME takes
        page.execute_script(fire, "compositionend")
        time.sleep(0.5)
        assert not spy.received and page.find_element(By.ID, "input").get_attribute("value") == "にほんご"
        page.find_element(By.ID, "input").send_keys(Keys.SHIFT, Keys.ENTER)  # a new line, not a message
        assert not spy.received
        page.execute_script(key, False, 13)  # Enter after the composition: sent
        wait(lambda: spy.received, "the message to be sent")
        wait(lambda: not generating(page), "the reply")
        users = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#messages .msg.user .body")]
        assert users[-1].strip() == "にほんご"
    finally:
        server.server.llm.engine.submit = spy.submit


def test_a_models_html_is_shown_as_text_never_run(server: Threaded, page: Any) -> None:
    evil = ("<script>window.pwned = 1</script>\n\n<img src=x onerror=\"window.pwned = 2\">\n\n"
            "[link](javascript:window.pwned=3) **太字**")
    store = {"current": "c1", "conversations": [{"id": "c1", "title": "<b>題</b>", "messages": [
        {"role": "user", "content": "<img src=x onerror=\"window.pwned = 4\">"},
        {"role": "assistant", "content": evil}]}]}
    page.execute_script("localStorage.setItem('kataru.chats', arguments[0])", json.dumps(store))
    page.refresh()
    wait(lambda: replies(page), "the stored reply")
    time.sleep(0.5)
    assert page.execute_script("return window.pwned") is None
    body = page.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .body")
    assert "<script>window.pwned = 1</script>" in body.text and "onerror" in body.text
    assert not body.find_elements(By.TAG_NAME, "script") and not body.find_elements(By.TAG_NAME, "img")
    assert body.find_element(By.TAG_NAME, "strong").text == "太字"  # Markdown itself renders
    assert not page.find_elements(By.CSS_SELECTOR, "#messages a[href^='javascript']")
    assert page.find_element(By.CSS_SELECTOR, "#conversations .title").text == "<b>題</b>"

    # and as the model streams it: the embedded model held by a JSON-schema constraint to a string of HTML
    from kataru.grammar import json_grammar

    page.execute_script("localStorage.clear()")
    page.refresh()
    wait(lambda: page.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model's name")
    html = "<script>window.pwned = 5</script><img src=x onerror='window.pwned = 6'>"
    spy = Spy(server.server.llm.engine)
    try:
        spy.grammar = json_grammar({"const": html})
        ask(page, "HTML を書いて")
        wait(lambda: not generating(page) and replies(page) and replies(page)[0], "the HTML reply")
    finally:
        server.server.llm.engine.submit = spy.submit
    body = page.find_element(By.CSS_SELECTOR, "#messages .msg.assistant .body")
    assert json.loads(body.text) == html  # every character shown as written
    assert not body.find_elements(By.TAG_NAME, "script") and not body.find_elements(By.TAG_NAME, "img")
    time.sleep(0.5)
    assert page.execute_script("return window.pwned") is None
    page.execute_script("localStorage.clear()")


def test_the_api_key_is_asked_once_and_kept_for_the_session_only() -> None:
    live = Threaded(lambda: kataru.load(progress=False), served_model_name="kataru-tiny-ja", api_keys=[KEY])
    driver = browser()
    try:
        driver.get(live.base + "/")
        wait(lambda: driver.find_element(By.ID, "keybox").is_displayed(), "the key box")
        driver.find_element(By.ID, "key").send_keys(KEY, Keys.ENTER)
        wait(lambda: driver.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model after the key")
        assert driver.execute_script("return sessionStorage.getItem('kataru.key')") == KEY
        assert KEY not in json.dumps(driver.execute_script("return {...localStorage}"))
        ask(driver, "こんにちは")
        wait(lambda: not generating(driver) and replies(driver), "a reply with the key")
        assert not driver.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        driver.refresh()  # the same session: not asked again
        wait(lambda: driver.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model after a reload")
        assert not driver.find_element(By.ID, "keybox").is_displayed()
    finally:
        driver.quit()
        live.stop()


def test_errors_from_the_server_are_shown_in_the_conversation(server: Threaded, page: Any) -> None:
    page.find_element(By.ID, "toggle-settings").click()
    tokens = page.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("100000")  # beyond the context: the server answers 400 with the counts
    page.expected = "status of 400 (Bad Request)"
    tokens.send_keys(Keys.TAB)
    ask(page, "長すぎる答え")
    error = wait(lambda: page.find_elements(By.CSS_SELECTOR, "#messages .msg.error"), "the error")
    assert "エラー" in error[0].text and "context" in error[0].text
    page.find_element(By.ID, "defaults").click()
    assert page.find_element(By.ID, "max_tokens").get_attribute("value") == "100"
    page.execute_script("localStorage.clear()")


def test_screenshot_shows_a_japanese_answer_in_real_glyphs(server: Threaded, page: Any) -> None:
    from PIL import Image, ImageStat

    page.execute_script("localStorage.clear()")
    page.refresh()
    wait(lambda: page.find_element(By.ID, "model").text == "kataru-tiny-ja", "the model's name")
    page.find_element(By.ID, "toggle-settings").click()
    page.find_element(By.ID, "system").send_keys("あなたは親切な日本語のアシスタントです。")
    seed = page.find_element(By.ID, "seed")
    seed.send_keys("1")
    page.find_element(By.ID, "toggle-settings").click()
    ask(page, "富士山について教えてください")
    wait(lambda: not generating(page) and replies(page) and replies(page)[0], "the answer")
    # A glyph drawn in the page's font must not look like the box drawn for a character no font has
    tofu = page.execute_script("""
        const font = '32px ' + getComputedStyle(document.documentElement).fontFamily;
        function draw(text) {
            const canvas = document.createElement('canvas'); canvas.width = 80; canvas.height = 40;
            const g = canvas.getContext('2d'); g.font = font; g.fillText(text, 4, 32);
            return Array.from(g.getImageData(0, 0, 80, 40).data).join(',');
        }
        const missing = draw('\\u{10FFFD}');
        return ['日', '本', 'あ', 'ア'].map((c) => draw(c) === missing || draw(c) === draw('\\u{E000}'));""")
    assert tofu == [False, False, False, False], "Japanese renders as tofu: install fonts-noto-cjk"
    assert page.execute_script("return document.fonts.check('16px \"Noto Sans CJK JP\"', '日本')")
    image = Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("L")
    assert image.size[0] >= 1000 and ImageStat.Stat(image).stddev[0] > 10, "the screenshot is blank"
    if os.environ.get("KATARU_SCREENSHOT"):
        Path(os.environ["KATARU_SCREENSHOT"]).write_bytes(page.get_screenshot_as_png())
    page.execute_script("localStorage.clear()")
