"""The console's HTTP side: login, sessions, CSRF, the live event stream and actions.

* **Login.** The password is ``[console] password`` in the node's config (not the
  node key). A right one gets a session cookie (random, HttpOnly,
  SameSite=Strict); a wrong one gets 401 and no page, after half a second (a
  brake on guessing). Every other path answers 401 without a session.
* **CSRF.** Each session has its own token, written into the page; an action
  must carry it in ``X-CSRF-Token``, or it is refused (403) and not run.
* **Live.** ``GET /api/events``: server-sent events, ``status`` (the node's own
  status, the dict ``coredr status --json`` prints) whenever it changes, at
  most twice a second, and each node ``event`` (``coredr events``) as it happens.
* **Actions.** ``POST /api/action/NAME`` runs the node's control handler through
  :func:`steelfusion.control.dispatch`, the code path of the control port, and
  answers the same words ``coredr`` prints: ``replication suspended``,
  ``replication already suspended`` or ``refused: REASON``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from importlib import resources
from typing import Any

from steelfusion import control, log
from steelfusion.console import NodeView, pages

_log = log.get("console")

COOKIE = "sf_console"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 64  # the oldest goes first; a login flood cannot grow memory
WRONG_PASSWORD_DELAY_S = 0.5
STREAM_PERIOD_S = 0.5
STATIC = {"console.js": "application/javascript", "console.css": "text/css"}


def said(cmd: str, reply: dict[str, Any]) -> str:
    """The line ``coredr CMD`` prints for ``reply``."""
    if not reply.get("ok"):
        return f"refused: {reply.get('error')}"
    if cmd == "failover":
        return (f"now {reply['role']} at epoch {reply['epoch']}, replication {reply['state']}; "
                "Edges move here automatically")
    return control.replication_said(reply)


class Sessions:
    """Logged-in browsers: cookie token -> (CSRF token, expiry)."""

    def __init__(self) -> None:
        self._by_token: dict[str, tuple[str, float]] = {}

    def new(self) -> tuple[str, str]:
        if len(self._by_token) >= MAX_SESSIONS:
            oldest = min(self._by_token, key=lambda t: self._by_token[t][1])
            del self._by_token[oldest]
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._by_token[token] = (csrf, time.monotonic() + SESSION_SECONDS)
        return token, csrf

    def csrf(self, token: str | None) -> str | None:
        """The session's CSRF token, or None: no such session, or it expired."""
        s = self._by_token.get(token or "")
        if s is None:
            return None
        if time.monotonic() > s[1]:
            self._by_token.pop(token or "", None)
            return None
        return s[0]

    def drop(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)


def console_app(web: Any, view: NodeView, password: str, closing: asyncio.Event) -> Any:
    """The aiohttp application of one node's console."""
    sessions = Sessions()
    static = {name: (resources.files("steelfusion.console") / "static" / name).read_bytes()
              for name in STATIC}

    def session(request: Any) -> str | None:
        return sessions.csrf(request.cookies.get(COOKIE))

    def unauthorized() -> Any:
        return web.Response(status=401, text="not logged in\n")

    async def index(request: Any) -> Any:
        csrf = session(request)
        if csrf is None:
            return web.Response(text=pages.login(view), content_type="text/html")
        return web.Response(text=pages.page(view, csrf), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def login(request: Any) -> Any:
        form = await request.post()
        given = str(form.get("password", ""))
        if not hmac.compare_digest(given.encode(), password.encode()):
            _log.warning("console_login_refused", node=view.name, peer=request.remote)
            await asyncio.sleep(WRONG_PASSWORD_DELAY_S)
            return web.Response(status=401, text="wrong password\n")
        token, _ = sessions.new()
        _log.info("console_login", node=view.name, peer=request.remote)
        resp = web.HTTPSeeOther("/")
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                        max_age=SESSION_SECONDS)
        return resp

    async def logout(request: Any) -> Any:
        csrf = session(request)
        if csrf is None or not hmac.compare_digest(
                str((await request.post()).get("csrf", "")), csrf):
            return web.Response(status=403, text="refused: no valid CSRF token\n")
        sessions.drop(request.cookies.get(COOKIE))
        resp = web.HTTPSeeOther("/")
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def asset(request: Any) -> Any:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        if name != "console.css" and session(request) is None:
            return unauthorized()
        return web.Response(body=static[name], content_type=STATIC[name])

    async def status(request: Any) -> Any:
        if session(request) is None:
            return unauthorized()
        return web.json_response(view.status(), dumps=lambda o: json.dumps(o, default=str))

    async def events(request: Any) -> Any:
        if session(request) is None:
            return unauthorized()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        recent = view.events(0)[-50:]
        since = recent[0]["n"] - 1 if recent else 0
        last = ""
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while not closing.is_set() and session(request) is not None:
                for ev in view.events(since):
                    since = max(since, ev["n"])
                    await resp.write(f"event: node\ndata: {json.dumps(ev, default=str)}\n\n"
                                     .encode())
                text = json.dumps(view.status(), default=str)
                if text != last:
                    last = text
                    await resp.write(f"event: status\ndata: {text}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STREAM_PERIOD_S):
                        await closing.wait()
        return resp

    async def action(request: Any) -> Any:
        csrf = session(request)
        if csrf is None:
            return unauthorized()
        cmd = request.match_info["cmd"]
        given = request.headers.get("X-CSRF-Token", "")
        if not given or not hmac.compare_digest(given, csrf):
            _log.warning("console_csrf_refused", node=view.name, cmd=cmd, peer=request.remote)
            return web.json_response({"ok": False, "code": "csrf", "error": "no valid CSRF "
                                      "token: reload the page"}, status=403)
        if cmd not in view.actions:
            raise web.HTTPNotFound()
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"ok": False, "code": "bad-request",
                                      "error": "the body must be a JSON object"}, status=400)
        req: dict[str, Any] = {"cmd": cmd}
        if cmd == "failover":
            req["force"] = body.get("force") is True
        _log.info("console_action", node=view.name, cmd=cmd, peer=request.remote, **{
            k: v for k, v in req.items() if k != "cmd"})
        reply = await control.dispatch(view.handlers, req)
        return web.json_response({**reply, "said": said(cmd, reply)},
                                 dumps=lambda o: json.dumps(o, default=str))

    app = web.Application(client_max_size=64 << 10)
    app.router.add_get("/", index)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/action/{cmd}", action)
    return app


__all__ = ["COOKIE", "Sessions", "console_app", "said"]
