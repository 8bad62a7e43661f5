"""ASGI middleware that answers an unexpected exception with OpenAI's 500 JSON and swallows it.

Starlette's own handler re-raises after replying, and uvicorn then closes the connection, so a
client's kept-alive connection would be reset after any 500."""

from __future__ import annotations

import json
import logging

from splitfuse.serving.protocol import error_body

log = logging.getLogger("splitfuse.serving")


class InternalErrors:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ConnectionError as exc:  # the client left or stopped reading: nobody to answer
            log.warning("dropped %s %s: %s", scope.get("method"), scope.get("path"), exc)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a reply, not a dropped connection
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if started:
                return  # the status is sent: the body simply ends here
            payload = json.dumps(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")).encode()
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
