"""The server's outer guard: one ASGI middleware in front of every Gradio route, checked before any handler.

Gradio builds the FastAPI app at `launch()`; `APP_KWARGS` (in the shell's launch
kwargs) puts `Guard` into it, and the guard finds the app's Policy on the Blocks
(`install`). For every request, in both modes:
- a body other than a multipart upload is read up to `request_kb` (413 beyond), and a
  JSON body is refused (400) when any string in it, keys included, holds a lone
  surrogate or a control character other than tab/newline/carriage return, or when
  its `session_hash` is not a plain id; so no handler (hidden ones included) can be
  handed text it would echo into a broken reply, and Gradio's queue never keys its
  bookkeeping by a poisoned session;
- the query string and a session id in the path get the same checks.
Public mode adds: deep links off (`/gradio_api/deep_link` is 404 and `?deep_link=` is
dropped, so no visitor's session state is ever written or served to another); uploads
need a Content-Length within `upload_files` x the file limit, hold at most
`upload_files` files (counted on a spooled copy before Gradio sees a byte), and are
refused (507) when Gradio's temp folder, all visitors together, would pass `temp_mb`;
HTML pages carry a Content-Security-Policy that lets no script, image, font or request
reach another origin.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from starlette.middleware import Middleware

from .. import bounds
from ..policy import Limits, Policy

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Lone surrogates, C0 controls but tab/newline/CR, DEL and C1 controls.
BAD_CHARS = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Gradio's page runs inline scripts and its own `js=` hooks (eval), so script-src keeps those; what the policy
# buys is that nothing reaches another origin: no fetch, image, font, frame or form target off this server.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
       "worker-src 'self' blob:; frame-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'")
SPOOL_MEMORY = 2**20  # an upload is spooled to disk beyond this while its files are counted
UPLOAD_SLACK = 2**16  # multipart headers and boundaries around the files themselves


@dataclass(frozen=True)
class GuardSettings:
    public: bool
    limits: Limits


def install(demo, policy: Policy, runner=None) -> None:
    """Hand the guard this app's policy; bound Gradio's queue, the training runner's time and the dataset sizes
    by it (the record bounds are the process's: one app serves a process, the last built decides)."""
    demo.ruozhi_guard = GuardSettings(policy.public, policy.limits)
    lim = policy.limits
    demo.queue(max_size=lim.queue_size or None, default_concurrency_limit=1)
    bounds.configure(lim.record_chars, lim.file_chars)
    if runner is not None:
        runner.max_seconds, runner.cooldown_s = lim.train_seconds, lim.train_cooldown_s


def bad_text(value) -> str | None:
    """The first offending character of any string in a decoded JSON value (keys too), as U+XXXX, else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = BAD_CHARS.search(item)
            if found:
                return f"U+{ord(found.group()):04X}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def folder_bytes(folder) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed meanwhile (Gradio's cache cleaner)
    return total


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(chunks, receive_rest):
    """A `receive` that hands the app an already-read body, then the real one (a disconnect, later)."""
    it = iter(chunks)

    async def receive():
        chunk = next(it, None)
        if chunk is None:
            return await receive_rest()
        body, more = chunk
        return {"type": "http.request", "body": body, "more_body": more}
    return receive


class Guard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self._settings(scope)
        if settings is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        problem = self._check_query(scope, settings)
        if problem:
            return await _reply(send, 400, problem)
        if settings.public and path.rstrip("/").endswith("/gradio_api/deep_link"):
            return await _reply(send, 404, "deep links are off in this public app")
        parts = path.split("/")
        if "heartbeat" in parts and not SESSION_ID.match(parts[-1] or "x"):
            return await _reply(send, 400, "invalid session id")
        if settings.public:
            send = self._with_headers(send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").startswith(b"multipart/"):
            if not settings.public:
                return await self.app(scope, receive, send)
            return await self._upload(scope, receive, send, settings, headers)
        return await self._json(scope, receive, send, settings)

    # --- per request ---------------------------------------------------------------------------
    @staticmethod
    def _settings(scope) -> GuardSettings | None:
        app = scope.get("app")
        blocks = app.get_blocks() if hasattr(app, "get_blocks") else None
        settings = getattr(blocks, "ruozhi_guard", None)
        holder = getattr(app, "state_holder", None)
        if settings is not None and holder is not None and holder.capacity != settings.limits.sessions:
            holder.capacity = settings.limits.sessions  # Gradio keeps this many sessions' state, oldest dropped
        return settings

    @staticmethod
    def _check_query(scope, settings: GuardSettings) -> str | None:
        raw = scope.get("query_string", b"")
        if not raw:
            return None
        try:
            pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            return "invalid characters in the query string"
        for key, value in pairs:
            if bad_text(key) or bad_text(value):
                return "invalid characters in the query string"
            if key == "session_hash" and not SESSION_ID.match(value):
                return "invalid session id"
        if settings.public and any(key == "deep_link" for key, _ in pairs):
            kept = [(k, v) for k, v in pairs if k != "deep_link"]
            scope["query_string"] = urlencode(kept).encode()  # the page as anyone gets it, no saved state
        return None

    @staticmethod
    def _with_headers(send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if content_type.startswith(b"text/html"):
                    headers.append((b"content-security-policy", CSP.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)
        return wrapped

    async def _json(self, scope, receive, send, settings: GuardSettings):
        limit = settings.limits.request_kb * 1024
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reply(send, 413, f"request body over {settings.limits.request_kb} KB")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _reply(send, 413, f"request body over {settings.limits.request_kb} KB")
        if body:
            try:
                value = json.loads(bytes(body))
            except RecursionError:
                return await _reply(send, 400, "request body nested too deep")
            except ValueError:
                value = None  # not JSON: the route's own parser answers
            if value is not None:
                bad = bad_text(value)
                if bad:
                    return await _reply(send, 400, f"invalid character {bad} in the request (a lone surrogate or a "
                                                   "control character): remove it from the text")
                session = value.get("session_hash") if isinstance(value, dict) else None
                if session is not None and not (isinstance(session, str) and SESSION_ID.match(session)):
                    return await _reply(send, 400, "invalid session id")
        await self.app(scope, _replay([(bytes(body), False)], receive), send)

    async def _upload(self, scope, receive, send, settings: GuardSettings, headers: dict):
        lim = settings.limits
        declared = headers.get(b"content-length", b"")
        if not declared.isdigit():
            return await _reply(send, 411, "an upload needs a Content-Length")
        max_file = lim.upload_mb * 2**20
        if int(declared) > lim.upload_files * max_file + UPLOAD_SLACK:
            return await _reply(send, 413, f"at most {lim.upload_files} files of {lim.upload_mb} MB in one upload")
        folder = getattr(scope.get("app"), "uploaded_file_dir", None)
        if lim.temp_mb and folder and folder_bytes(folder) + int(declared) > lim.temp_mb * 2**20:
            return await _reply(send, 507, "the server's upload space is full right now: try again later")
        boundary = re.search(rb"boundary=\"?([^\";]+)", headers.get(b"content-type", b""))
        if not boundary:
            return await _reply(send, 400, "a multipart upload without a boundary")
        delimiter = b"--" + boundary.group(1)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        try:
            count, tail, size, more = 0, b"", 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                if size > int(declared):
                    return await _reply(send, 400, "the upload is longer than its Content-Length")
                window = tail + chunk
                count += window.count(delimiter) - tail.count(delimiter)
                tail = window[-(len(delimiter) - 1):]
                if count - 1 > lim.upload_files:  # the last delimiter closes the body
                    return await _reply(send, 413, f"at most {lim.upload_files} files in one upload")
                spool.write(chunk)
            spool.seek(0)

            def chunks():
                while True:
                    block = spool.read(2**16)
                    if not block:
                        yield b"", False
                        return
                    yield block, True
            await self.app(scope, _replay(chunks(), receive), send)
        finally:
            spool.close()


APP_KWARGS = {"middleware": [Middleware(Guard)]}

