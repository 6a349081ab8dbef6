"""`streamv2v models pull|list|rm`: the work behind the CLI's parsing (daemon/cli/)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from daemon.models.cache import cached_models, listing_text, remove_model
from daemon.models.fetch import cache_dir, ensure_cached, offline, pull
from daemon.models.needs import FetchError, needs_of_daemon
from daemon.models.progress import BarProgress, human_bytes


def pull_command(
    config: Any, presets: Iterable[Any], models: list[str], out: TextIO = sys.stdout
) -> None:
    """Fetch what the configuration (or each of ``models``) needs, with a progress bar."""
    needs = needs_of_daemon(config, presets, models)
    if not needs:
        print("nothing to fetch: the configuration uses local folders or built-in models", file=out)
        return
    for need in needs:
        print(f"{need.label} {need.repo}", file=out)
    if offline():  # nothing can be fetched: say whether anything is missing
        ensure_cached(needs, BarProgress(sys.stderr))
        where = f"{cache_dir()}; HF_HUB_OFFLINE is set: not checked for updates"
        print(f"all in the cache ({where})", file=out)
        return
    done = pull(needs, BarProgress(sys.stderr))
    fetched = human_bytes(done.total_bytes)
    print(
        f"{len(done.files)} files fetched ({fetched}), {len(done.cached)} already there, "
        f"in {cache_dir()}",
        file=out,
    )


def list_command(out: TextIO = sys.stdout) -> None:
    print(listing_text(cached_models()), file=out)


def rm_command(models: list[str], out: TextIO = sys.stdout) -> None:
    if not models:
        raise FetchError("name the model(s) to remove, e.g. streamv2v models rm org/name")
    for model in models:
        freed = remove_model(model)
        print(f"removed {model} ({human_bytes(freed)})", file=out)
