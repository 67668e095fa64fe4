"""The operator console (SPEC §11) in a real headless Chromium (the OS's `chromium` and
`chromium-driver`, driven by selenium) against a real cluster and the real gateway.

Set SCREENSHOTS_DIR to keep a screenshot of each page (`make screenshots` writes the
ones in docs/console/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import struct_pb2

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, make_project, make_type, spawn
from tests.helpers.receiver import Receiver
from tests.helpers.servers import serve_gateway, start_cluster, stop_cluster

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("AGENTPLANE_REQUIRE_BROWSER"):
        raise RuntimeError("the console tests need the OS's chromium and chromium-driver")
    pytest.skip(
        "no chromium/chromedriver on this machine (CI installs them)", allow_module_level=True
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PAGES = ["overview", "agents", "threads", "usage", "budgets"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,720", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
async def world(redis_url):  # type: ignore[no-untyped-def]
    cluster = await start_cluster(redis_url, False)
    try:
        await make_project(cluster.agent)
        await make_type(cluster.agent)
        alpha = await spawn(cluster.agent, "alpha")
        beta = await spawn(cluster.agent, "beta")
        thread = await cluster.thread.CreateThread(T.CreateThreadRequest(
            thread=thread_pb2.Thread(project_id="demo", title="research", participants=[alpha.id])))  # fmt: skip
        body = struct_pb2.Struct()
        body.update({"text": "start"})
        await cluster.thread.InjectMessage(T.InjectMessageRequest(
            to=alpha.id, thread_id=thread.id, payload=body))  # fmt: skip
        for n, model in enumerate(["gpt-4o", "gpt-4o-mini", "gpt-4o"]):
            await cluster.usage.RecordUsage(U.RecordUsageRequest(
                usage_id=f"u{n}", agent_id=alpha.id, thread_id=thread.id, model=model,
                prompt_tokens=1000, completion_tokens=234))  # fmt: skip
        async with serve_gateway(cluster) as url:
            yield {"cluster": cluster, "url": url, "alpha": alpha, "beta": beta, "thread": thread}
    finally:
        await stop_cluster(cluster)


async def run(fn, *args):  # type: ignore[no-untyped-def]
    """Selenium blocks: run it in a thread so the in-process servers keep serving."""
    return await asyncio.to_thread(fn, *args)


def wait(driver: Any, condition: Any, timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def open_page(driver: Any, url: str, page: str) -> None:
    driver.get(f"{url}/ui/#/{page}")
    wait(driver, lambda d: d.find_element(By.ID, "main").get_attribute("data-ready") == "1")


def sign_in(driver: Any, url: str, token: str = ADMIN_TOKEN) -> None:
    driver.get(f"{url}/ui/")
    driver.execute_script("sessionStorage.clear(); localStorage.clear();")
    driver.get(f"{url}/ui/")
    field = wait(driver, lambda d: d.find_element(By.ID, "token"))
    wait(driver, lambda d: field.is_displayed())
    field.send_keys(token + Keys.ENTER)  # the keyboard alone signs in
    wait(driver, lambda d: d.find_element(By.ID, "main").get_attribute("data-ready") == "1")


def text(driver: Any, css: str) -> str:
    """An element's text, read in one go (pages redraw parts of themselves)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css
    )


def shoot(driver: Any, name: str) -> None:
    folder = os.environ.get("SCREENSHOTS_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, f"{name}.png"))


def requests_made(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


async def test_sign_in_shows_the_recorded_totals_and_keeps_the_token_private(
    browser, world
) -> None:
    url = world["url"]
    browser.get_log("performance")  # start the network log afresh
    await run(sign_in, browser, url)
    assert await run(text, browser, "#total-tokens") == "3,702"
    assert "$" in await run(text, browser, "#total-cost")
    assert (await run(text, browser, "#agents-by-status")).count("IDLE") == 1
    await run(shoot, browser, "overview")
    for page in PAGES[1:]:
        await run(open_page, browser, url, page)
        await run(shoot, browser, page)
    storage = await run(browser.execute_script,
                        "return [sessionStorage.getItem('agentplane.token'), JSON.stringify(localStorage), location.href]")  # fmt: skip
    assert (
        storage[0] == ADMIN_TOKEN
        and ADMIN_TOKEN not in storage[1]
        and ADMIN_TOKEN not in storage[2]
    )
    urls = await run(requests_made, browser)
    assert urls and all(u.startswith(url) or u.startswith("data:") for u in urls), urls
    assert not [u for u in urls if ADMIN_TOKEN in u]
    assert any("/api/v1/organism" in u for u in urls) and any("usage:timeSeries" in u for u in urls)


async def test_an_operator_pauses_and_terminates_agents(browser, world) -> None:
    url, cluster, alpha, beta = world["url"], world["cluster"], world["alpha"], world["beta"]
    await run(sign_in, browser, url)
    await run(open_page, browser, url, "agents")

    def click(agent_id: str, label: str) -> None:
        row = browser.find_element(By.CSS_SELECTOR, f'tr[data-agent="{agent_id}"]')
        next(b for b in row.find_elements(By.TAG_NAME, "button") if b.text == label).click()

    def status_of(agent_id: str) -> str:  # read in one go: the row is redrawn after an action
        return browser.execute_script(
            "const c = document.querySelector(arguments[0]); return c ? c.textContent : '';",
            f'tr[data-agent="{agent_id}"] .agent-status',
        )

    await run(click, alpha.id, "Pause")
    await run(wait, browser, lambda d: status_of(alpha.id) == "PAUSED")
    assert "Pause: alpha done" in await run(text, browser, "#flash")
    got = await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=alpha.id))
    assert got.status == 4  # AGENT_STATUS_PAUSED, over gRPC too
    await run(click, beta.id, "Terminate")  # asks first
    assert (await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=beta.id))).status == 1
    await run(click, beta.id, "Confirm terminate")
    await run(wait, browser, lambda d: status_of(beta.id) == "TERMINATED")
    assert (await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=beta.id))).status == 5
    await run(click, alpha.id, "Resume")
    await run(wait, browser, lambda d: status_of(alpha.id) == "IDLE")
    await run(open_page, browser, url, f"agents/{alpha.id}")  # an agent's page: its usage
    assert await run(text, browser, "#agent-tokens") == "3,702"
    await run(shoot, browser, "agent")


async def test_an_operator_kills_a_thread_and_sees_messages_live(browser, world) -> None:
    url, cluster, thread, alpha = world["url"], world["cluster"], world["thread"], world["alpha"]
    await run(sign_in, browser, url)
    await run(open_page, browser, url, f"threads/{thread.id}")
    assert "start" in await run(text, browser, "#messages")
    await run(wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages[data-live]"))
    body = struct_pb2.Struct()
    body.update({"text": "live one"})
    await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=alpha.id, thread_id=thread.id, payload=body)
    )
    await run(wait, browser, lambda d: "live one" in text(d, "#messages"))
    await run(shoot, browser, "thread")

    def kill(label: str) -> None:
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == label).click()

    def reason(value: str) -> None:
        browser.find_element(By.ID, "kill-reason").send_keys(value)

    await run(reason, "runaway loop")
    await run(kill, "Kill thread")
    await run(kill, "Confirm kill")
    await run(wait, browser, lambda d: "KILLED" in text(d, "#thread-head"))
    await run(wait, browser, lambda d: "runaway loop" in text(d, "#thread-head"))
    got = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id))
    assert got.thread.status == thread_pb2.THREAD_STATUS_KILLED
    assert got.thread.end_reason == "runaway loop"
    # Opened afresh, the page shows the reason too (from GET /threads/{id}'s flat shape).
    await run(open_page, browser, url, f"threads/{thread.id}")
    await run(wait, browser, lambda d: "runaway loop" in text(d, "#thread-head"))


async def test_a_budget_made_in_the_console_alerts_live_on_the_overview(browser, world) -> None:
    url, cluster, alpha, thread = world["url"], world["cluster"], world["alpha"], world["thread"]
    await run(sign_in, browser, url)
    await run(open_page, browser, url, "budgets")

    def submit() -> None:
        browser.find_element(By.CSS_SELECTOR, "#budget-form button[type=submit]").click()

    await run(submit)  # no limit at all: the API's own error is shown
    await run(wait, browser, lambda d: "Create budget failed" in text(d, "#flash"))
    assert "limit" in await run(text, browser, "#flash")

    def create() -> None:
        browser.find_element(By.ID, "b-tokens").send_keys("10000")
        browser.find_element(By.ID, "b-thresholds").clear()
        browser.find_element(By.ID, "b-thresholds").send_keys("50")
        browser.find_element(By.CSS_SELECTOR, "#budget-form button[type=submit]").click()

    await run(create)
    await run(wait, browser, lambda d: "Budget created" in text(d, "#flash"))
    await run(wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#budget-list tr"))
    await run(open_page, browser, url, "overview")
    await run(wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#alerts[data-live]"))
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id="over-half", agent_id=alpha.id, thread_id=thread.id, model="gpt-4o",
        prompt_tokens=6000, completion_tokens=10))  # fmt: skip
    await run(wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#alerts li[data-alert]"))
    assert "50%" in await run(text, browser, "#alerts")
    assert "PROJECT" in await run(text, browser, "#budget-bars")


async def test_a_minute_window_shows_the_last_minute_and_calls_in_flight(browser, world) -> None:
    url, cluster, thread = world["url"], world["cluster"], world["thread"]
    await run(sign_in, browser, url)
    await run(open_page, browser, url, "budgets")

    def create() -> None:
        browser.find_element(By.ID, "b-scope-id").clear()
        Select(browser.find_element(By.ID, "b-scope")).select_by_visible_text("THREAD")
        browser.find_element(By.ID, "b-scope-id").send_keys(thread.id)
        browser.find_element(By.ID, "b-tokens").send_keys("5000")
        browser.find_element(By.ID, "b-requests").send_keys("60")
        browser.find_element(By.ID, "b-in-flight").send_keys("2")
        Select(browser.find_element(By.ID, "b-period")).select_by_visible_text("MINUTE")
        browser.find_element(By.CSS_SELECTOR, "#budget-form button[type=submit]").click()

    await run(create)
    await run(wait, browser, lambda d: "Budget created" in text(d, "#flash"))
    await cluster.usage.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="console-window", thread_id=thread.id, tokens=1200))  # fmt: skip
    await run(open_page, browser, url, "overview")
    await run(wait, browser, lambda d: "in flight 1 / 2" in text(d, "#budget-bars"))
    bars = await run(text, browser, "#budget-bars")
    assert "used in the last minute: 1,200 / 5,000 tokens, 1 / 60 requests" in bars
    await cluster.usage.ReleaseReservation(U.ReleaseReservationRequest(
        reservation_id="console-window", thread_id=thread.id))  # fmt: skip


async def test_the_usage_page_and_an_agents_page_list_model_calls(browser, world) -> None:
    from google.protobuf import timestamp_pb2
    from ulid import ULID

    from agentplane.usage.v1 import usage_pb2 as P

    url, cluster, alpha = world["url"], world["cluster"], world["alpha"]
    start = timestamp_pb2.Timestamp()
    start.GetCurrentTime()
    call = P.ModelCall(
        call_id=str(ULID()), project_id="demo", agent_id=alpha.id, model_requested="gpt-4o",
        outcome=P.MODEL_CALL_OUTCOME_OK, http_status=200, start_time=start,
    )  # fmt: skip
    call.time_to_first_token.FromMilliseconds(42)
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id=call.call_id, agent_id=alpha.id, project_id="demo", model="gpt-4o",
        prompt_tokens=3000, completion_tokens=21, call=call, estimated=True))  # fmt: skip
    refused = P.ModelCall(call_id=str(ULID()), project_id="demo", agent_id=alpha.id, start_time=start,
                          model_requested="gpt-4o", outcome=P.MODEL_CALL_OUTCOME_REFUSED,
                          reason="budget_exceeded", http_status=429)  # fmt: skip
    await cluster.usage.LogModelCall(U.LogModelCallRequest(call=refused))
    await run(sign_in, browser, url)
    await run(browser.execute_script, "sessionStorage.setItem('agentplane.project', 'demo')")
    await run(open_page, browser, url, "usage")
    calls = await run(text, browser, "#calls-table")
    assert "budget_exceeded" in calls and "REFUSED" in calls
    assert "3,021 (est.)" in calls and "42 ms" in calls
    await run(open_page, browser, url, f"agents/{alpha.id}")
    assert "3,021 (est.)" in await run(text, browser, "#agent-calls")
    await run(shoot, browser, "agent")


async def test_every_page_fits_a_phone_and_charts_draw(browser, world) -> None:
    url = world["url"]
    await run(sign_in, browser, url)
    try:
        await run(browser.set_window_size, 390, 844)
        for page in [*PAGES, f"agents/{world['alpha'].id}", f"threads/{world['thread'].id}"]:
            await run(open_page, browser, url, page)
            wide = await run(browser.execute_script,
                             "return document.documentElement.scrollWidth - window.innerWidth")  # fmt: skip
            assert wide <= 0, f"{page} scrolls sideways by {wide}px at 390x844"
        await run(shoot, browser, "phone-thread")
        await run(open_page, browser, url, "usage")
        assert (
            await run(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#usage-chart rect"))) >= 1
        )
    finally:
        await run(browser.set_window_size, 1280, 720)


async def test_budgets_are_edited_and_reset_and_webhooks_show_their_deliveries(
    browser, world
) -> None:
    url, cluster, alpha, thread = world["url"], world["cluster"], world["alpha"], world["thread"]
    await run(sign_in, browser, url)
    await run(open_page, browser, url, "budgets")

    def fill_and_create() -> None:
        browser.find_element(By.ID, "b-tokens").send_keys("8000")
        browser.find_element(By.CSS_SELECTOR, "#budget-form button[type=submit]").click()

    await run(fill_and_create)
    await run(wait, browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#budget-list tr"))

    def press(label: str) -> None:
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == label).click()

    def edit() -> None:
        row = browser.find_element(By.CSS_SELECTOR, "#budget-list tr")
        limit = row.find_element(By.CSS_SELECTOR, "input[aria-label='token limit']")
        limit.clear()
        limit.send_keys("20000")
        press("Save")

    await run(edit)
    await run(wait, browser, lambda d: "Budget saved" in text(d, "#flash"))
    listed = await cluster.usage.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
    assert [b.limit_tokens for b in listed.budgets] == [20000]  # changed through the API
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id="some", agent_id=alpha.id, thread_id=thread.id, model="gpt-4o",
        prompt_tokens=500, completion_tokens=0))  # fmt: skip
    await run(press, "Reset")
    await run(press, "Confirm reset")
    await run(wait, browser, lambda d: "Budget reset" in text(d, "#flash"))
    listed = await cluster.usage.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
    assert listed.budgets[0].used_tokens == 0 and listed.budgets[0].reset_by

    receiver = await Receiver().start()
    try:

        def add_hook() -> None:
            browser.find_element(By.ID, "w-url").send_keys(receiver.url)
            browser.find_element(By.CSS_SELECTOR, "#webhook-form button[type=submit]").click()

        await run(add_hook)
        await run(wait, browser, lambda d: "Signing secret (shown once)" in text(d, "#w-secret"))
        await cluster.usage.RecordUsage(U.RecordUsageRequest(  # past 50% of 20,000
            usage_id="half", agent_id=alpha.id, thread_id=thread.id, model="gpt-4o",
            prompt_tokens=15000, completion_tokens=0))  # fmt: skip
        await receiver.wait_for(1)
        await run(press, "Deliveries")
        await run(wait, browser, lambda d: "DELIVERED" in text(d, "#deliveries"))
        await run(shoot, browser, "budgets")
    finally:
        await receiver.stop()


async def test_long_lists_page_and_usage_exports(browser, world) -> None:
    url, cluster = world["url"], world["cluster"]
    for n in range(30):
        await spawn(cluster.agent, f"extra-{n:02d}")
    await run(sign_in, browser, url)
    await run(open_page, browser, url, "agents")
    first = await run(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr[data-agent]")))

    def next_page() -> None:
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Next").click()

    await run(next_page)
    await run(wait, browser, lambda d: "Page 2" in text(d, ".pager"))
    second = await run(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr[data-agent]")))
    assert (first, second) == (25, 7)  # 32 agents, 25 a page

    await run(open_page, browser, url, "usage")

    def by_agent_then_export() -> None:
        browser.find_element(By.ID, "usage-group").send_keys("by agent")
        next(
            b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Download CSV"
        ).click()

    await run(by_agent_then_export)
    await run(wait, browser, lambda d: "CSV exported" in text(d, "#flash"))
    assert await run(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#usage-chart rect"))) >= 1


async def test_the_api_docs_page_has_the_consoles_security_headers_and_still_works(
    browser, world
) -> None:
    import httpx

    url = world["url"]
    async with httpx.AsyncClient(base_url=url) as http:
        page = await http.get("/docs")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    for header in ("x-content-type-options", "referrer-policy", "x-frame-options"):
        assert page.headers[header], header

    def rows(driver: Any) -> int:
        driver.get(f"{url}/docs")
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ops tr")) > 20)
        return len(driver.find_elements(By.CSS_SELECTOR, "#ops tr"))

    assert await run(rows, browser) > 20  # its script ran under the policy
    refused = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not refused, refused
