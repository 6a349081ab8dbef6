"""A Hugging Face-compatible hub on 127.0.0.1 for tests: real files from folders, real HTTP.

It serves what huggingface_hub reads (see /work/shared/TESTING.md):
    GET /api/models/{org}/{name}[/revision/{rev}]   model info, siblings with sizes
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}      the file, with Range, ETag,
                                                     X-Linked-Etag, X-Repo-Commit, Content-Length
and counts the bytes it sends per file. Options: a rate limit (bytes/s), a stall (after N bytes
of a body), and an error status per repository (404, 401, 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections import Counter
from pathlib import Path

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """The hub in a thread of its own; ``url`` is its HF_ENDPOINT."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.served: Counter[str] = Counter()  # "org/name/path" -> body bytes sent
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.rate_bps: float | None = None
        self.stall_after: dict[str, int] = {}  # repo -> stop sending a body after N bytes
        self.ranges: list[tuple[str, str]] = []  # (repo/path, Range header) of each GET
        self.status: dict[str, int] = {}  # repo -> error status
        self._etags: dict[Path, str] = {}
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.url = ""

    def online_env(self, home: Path, **extra: str) -> dict[str, str]:
        """The environment of a process that downloads from this hub into the hub cache at
        ``home``: tests/conftest.py makes every test offline, this one opts back in."""
        env = dict(os.environ, HF_ENDPOINT=self.url, HF_HOME=str(home), PYTHONUNBUFFERED="1")
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_HUB_DISABLE_XET"] = "1"
        env.update(extra)
        return env

    def __enter__(self) -> HubServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _stop(self) -> None:
        await self._runner.cleanup()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # stalled answers
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def bytes_served(self, repo: str | None = None) -> int:
        return sum(n for k, n in self.served.items() if repo is None or k.startswith(repo + "/"))

    # ------------------------------------------------------------------ handlers
    async def _gate(self, repo: str) -> None:
        code = self.status.get(repo)
        if code == 404 or repo not in self.repos:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound"}, text='{"error":"Repository not found"}'
            )
        if code in (401, 403):
            cls = web.HTTPUnauthorized if code == 401 else web.HTTPForbidden
            raise cls(
                headers={"X-Error-Code": "GatedRepo"},
                text='{"error":"Access to this model is restricted"}',
            )

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _etag(self, path: Path) -> str:
        if path not in self._etags:  # content hash of the first 1 MB + size: unique enough here
            with path.open("rb") as f:
                head = f.read(1 << 20)
            self._etags[path] = hashlib.sha256(head + str(path.stat().st_size).encode()).hexdigest()
        return self._etags[path]

    async def info(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append((request.method, request.path))
        await self._gate(repo)
        siblings = [
            {"rfilename": name, "size": path.stat().st_size, "blobId": self._etag(path)[:40]}
            for name, path in self._files(repo).items()
        ]
        return web.json_response(
            {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
        )

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        name = request.match_info["path"]
        self.requests.append((request.method, request.path_qs))
        await self._gate(repo)
        path = self._files(repo).get(name)
        if path is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        size = path.stat().st_size
        etag = self._etag(path)
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{etag}"',
            "X-Linked-Etag": f'"{etag}"',
            "X-Linked-Size": str(size),
            "Accept-Ranges": "bytes",
        }
        start, status = 0, 200
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            first = rng[len("bytes=") :].split("-")[0]
            start, status = int(first or 0), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        headers["Content-Length"] = str(size - start)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        key = f"{repo}/{name}"
        self.ranges.append((key, rng))
        stall = self.stall_after.get(repo)
        with contextlib.suppress(ConnectionResetError):  # the client went away (a test killed it)
            await self._send(response, path, start, key, stall)
        return response

    async def _send(
        self, response: web.StreamResponse, path: Path, start: int, key: str, stall: int | None
    ) -> None:
        sent = 0
        with path.open("rb") as f:
            f.seek(start)
            while chunk := f.read(64 * 1024 if self.rate_bps is None else 16 * 1024):
                if stall is not None and sent + len(chunk) > stall:
                    chunk = chunk[: max(0, stall - sent)]
                    await response.write(chunk)
                    self.served[key] += len(chunk)
                    await asyncio.sleep(3600)
                await response.write(chunk)
                sent += len(chunk)
                self.served[key] += len(chunk)
                if self.rate_bps:
                    await asyncio.sleep(len(chunk) / self.rate_bps)
        await response.write_eof()
