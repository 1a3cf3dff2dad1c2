"""A minimal user agent for the consent page: real HTTP, real HTML form submission."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin

import httpx


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method = "get"
        self.fields: dict[str, str] = {}
        self.buttons: dict[str, tuple[str, str]] = {}  # button value -> (name, value)
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self._in_form = True
            self.action = a.get("action", "")
            self.method = a.get("method", "get").lower()
        elif self._in_form and tag == "input" and a.get("name"):
            if a.get("type", "text") not in ("submit", "button"):
                self.fields[a["name"]] = a.get("value", "")
        elif self._in_form and tag == "button" and a.get("name"):
            self.buttons[a.get("value", "")] = (a["name"], a.get("value", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


class ConsentError(AssertionError):
    pass


def _submission(
    page_url: str, resp: httpx.Response, username: str, approve: bool
) -> tuple[str, dict[str, str]]:
    if resp.status_code != 200 or "text/html" not in resp.headers.get("content-type", ""):
        raise ConsentError(f"no consent page: {resp.status_code} {resp.text[:300]}")
    parser = _FormParser()
    parser.feed(resp.text)
    if parser.action is None:
        raise ConsentError("the consent page has no form")
    data = dict(parser.fields)
    data["username"] = username
    choice = parser.buttons.get("allow" if approve else "deny")
    if choice is None:
        raise ConsentError("the consent form has no Allow/Deny button")
    data[choice[0]] = choice[1]
    return urljoin(page_url, parser.action), data


def _location(resp: httpx.Response) -> str:
    if resp.status_code not in (302, 303) or "location" not in resp.headers:
        raise ConsentError(f"expected a redirect, got {resp.status_code}: {resp.text[:300]}")
    return resp.headers["location"]


def drive_consent(url: str, username: str, approve: bool, http: httpx.Client) -> str:
    resp = http.get(url, follow_redirects=False)
    if resp.status_code in (302, 303):  # auto-approve, or an error redirect
        return _location(resp)
    action, data = _submission(url, resp, username, approve)
    return _location(http.post(action, data=data, follow_redirects=False))


async def adrive_consent(
    url: str, username: str, approve: bool, http: httpx.AsyncClient | None
) -> str:
    own = http is None
    client = http or httpx.AsyncClient(timeout=10)
    try:
        resp = await client.get(url, follow_redirects=False)
        if resp.status_code in (302, 303):
            return _location(resp)
        action, data = _submission(url, resp, username, approve)
        return _location(await client.post(action, data=data, follow_redirects=False))
    finally:
        if own:
            await client.aclose()
