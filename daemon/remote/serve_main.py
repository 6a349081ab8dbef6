"""``streamv2v serve``'s main: the agent first (HAProxy hears ``down`` while the model loads),
the model, then the signalling server, until SIGINT/SIGTERM or the end of a drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from daemon.errors import UserError
from daemon.models.registry import BUILTIN_MODELS, model_location
from daemon.remote.agent import Capacity, Drain, start_agent
from daemon.remote.server import (
    RemoteServer,
    ServeLimits,
    ServeOptions,
    serve_runner,
    serve_token,
)
from daemon.remote.session import SharedModel
from streamv2v import EngineConfig, LoraSpec

log = logging.getLogger("streamv2v.serve")


def serve(
    options: ServeOptions,
    *,
    ready: Callable[[str], None] | None = None,
    extend: Callable[[RemoteServer, ServeOptions], None] | None = None,
) -> None:
    """Load the model once and serve sessions until SIGINT/SIGTERM, or until the last session of
    a drain (SIGUSR1, ``POST /admin/drain``) ends; ``extend`` adds the other ways in (WHIP/WHEP
    and the page: daemon/remote/browser.py, passed by the CLI). With ``agent_port`` the agent
    answers HAProxy from the start (``down`` while the model loads)."""
    token = serve_token(options)
    config = EngineConfig(
        vae=options.vae or ("model" if options.model in BUILTIN_MODELS else EngineConfig().vae),
        loras=tuple(LoraSpec(id=lora) for lora in options.loras),
    )
    holder: list[RemoteServer] = []

    def capacity() -> Capacity:
        if holder:
            return holder[0].capacity()
        return Capacity("loading", 0, options.max_sessions)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        agent = None
        if options.agent_port is not None:
            try:
                agent = await start_agent(options.listen, options.agent_port, capacity)
            except OSError as err:
                raise UserError(
                    f"cannot listen on {options.listen}:{options.agent_port} "
                    f"({err.strerror or err}); choose another --agent-port"
                ) from None
            log.info("serve: HAProxy agent on port %d", options.agent_port)
        log.info("serve: loading %s", options.model)
        model = await loop.run_in_executor(
            None,
            SharedModel.load,
            model_location(options.model),
            config,
            options.device,
            None,
            options.allow_pickle,
        )
        server = RemoteServer(model, ServeLimits(token, options.max_sessions))
        stop = asyncio.Event()
        server.drain = Drain(stop.set)
        if extend is not None:
            extend(server, options)
        runner = serve_runner(server.app)
        await runner.setup()
        site = web.TCPSite(runner, options.listen, options.port)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            model.close()
            raise UserError(
                f"cannot listen on {options.listen}:{options.port} ({err.strerror or err}); "
                "choose another --port"
            ) from None
        holder.append(server)  # the agent says up from now on
        host = f"[{options.listen}]" if ":" in options.listen else options.listen
        url = f"http://{host}:{options.port}"
        auth = "token required" if token else "no token (loopback only)"
        log.info(
            "serve: %s on %s, up to %d session(s), %s; daemons set [engine] remote = %r",
            options.model,
            url,
            options.max_sessions,
            auth,
            url,
        )
        if ready is not None:
            ready(url)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(
                signal.SIGUSR1, lambda: server.drain.start(len(server.sessions), "SIGUSR1")
            )
        try:
            await stop.wait()
        finally:
            if agent is not None:
                agent.close()
            await runner.cleanup()
            model.close()

    asyncio.run(main())
