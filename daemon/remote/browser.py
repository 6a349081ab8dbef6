"""The ways into ``serve`` besides a daemon's offer: WHIP ingest, WHEP viewers and the page,
added to the RemoteServer by the CLI (``serve(options, extend=add_browser_ways)``), so server.py
needs no import of them. One session type (server.py's PeerSession) whatever the way in."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from daemon.errors import UserError
from daemon.remote.library import ServePresets, serve_base
from daemon.remote.page import add_page
from daemon.remote.whep import WhepEndpoints
from daemon.remote.whip import WhipEndpoints

if TYPE_CHECKING:
    from daemon.remote.server import RemoteServer, ServeOptions

log = logging.getLogger("streamv2v.serve")


def add_browser_ways(server: RemoteServer, options: ServeOptions) -> WhipEndpoints:
    """Add the WHIP/WHEP routes, the preset library and the page to ``server``."""
    try:
        presets = ServePresets(options.model, options.presets, serve_base(options.model))
    except ValueError as err:
        raise UserError(str(err)) from None
    whip = WhipEndpoints(server, presets, options.ice_servers)
    WhepEndpoints(whip)
    add_page(server.app, whip.gate)
    for where, why in presets.errors.items():
        log.error("preset %s: %s", where, why)
    log.info(
        "serve: WHIP at /whip (presets %s; default %s), WHEP at /whep/ID, the page at / "
        "(its login link: POST /login-code with the token)",
        ", ".join(presets.names()),
        presets.default.name,
    )
    return whip
