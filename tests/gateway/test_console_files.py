"""The console's files as the gateway serves them: no token needed for the files, a strict
CSP on every one, the right types, and nothing else under /ui/ (the browser tests are in
tests/console)."""

from __future__ import annotations

import re

import httpx

from gateway.app import UI


async def test_console_files_are_served_with_a_strict_policy(http) -> None:
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as anonymous:
        page = await anonymous.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        script = await anonymous.get("/ui/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.headers["content-security-policy"] == policy
        assert (await anonymous.get("/ui/app.css")).headers["content-type"].startswith("text/css")
        moved = await anonymous.get("/ui")
        assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
        for missing in ("/ui/nope.js", "/ui/../gateway/app.py", "/ui/%2e%2e/README.md"):
            assert (await anonymous.get(missing)).status_code == 404
        # The API behind it still wants a token.
        assert (await anonymous.get("/api/v1/projects")).status_code == 401


def test_the_page_loads_nothing_from_another_host_and_runs_no_inline_code() -> None:
    html = (UI / "index.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith(("/ui/", "#", "data:")) for s in sources), sources
    assert "<script>" not in html and "style=" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    code = (UI / "app.js").read_text()
    # No address of another host (the SVG namespace and a form's placeholder are not loaded).
    code_addresses = set(re.findall(r"https?://[^\s\"'`]+", code))
    assert code_addresses <= {"http://www.w3.org/2000/svg", "https://example.com/hook"}
    assert "localStorage.setItem" not in code
    assert "innerHTML" not in code  # text goes in as text nodes: no markup from the API
