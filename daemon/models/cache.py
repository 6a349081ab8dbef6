"""`streamv2v models list` and `models rm`: what the hub cache holds, and removing a model.

The pull (daemon/models/fetch.py) and the daemon's first run write here; huggingface_hub's own
``scan_cache_dir`` reads it, so a model another tool downloaded shows as well.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from daemon.models.fetch import cache_dir
from daemon.models.needs import FetchError
from daemon.models.progress import human_bytes


@dataclass(frozen=True)
class CachedModel:
    repo: str
    size_bytes: int
    files: int
    partial_bytes: int  # an interrupted pull's partial files (resumed by the next pull)


def cached_models() -> list[CachedModel]:
    """Every model repository in the hub cache, with its size on disk."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        partial = sum(p.stat().st_size for p in (repo.repo_path / "blobs").glob("*.incomplete"))
        files = len({f.file_path for rev in repo.revisions for f in rev.files})
        models.append(CachedModel(repo.repo_id, repo.size_on_disk, files, partial))
    return models


def listing_text(models: list[CachedModel]) -> str:
    if not models:
        return f"no models in {cache_dir()} (fetch them with: streamv2v models pull)"
    width = max(len(m.repo) for m in models)
    lines = [f"{'MODEL':<{width}}  {'SIZE':>9}  FILES   ({cache_dir()})"]
    for m in models:
        extra = f"  + {human_bytes(m.partial_bytes)} partial" if m.partial_bytes else ""
        lines.append(f"{m.repo:<{width}}  {human_bytes(m.size_bytes):>9}  {m.files:>5}{extra}")
    lines.append(f"{'total':<{width}}  {human_bytes(sum(m.size_bytes for m in models)):>9}")
    return "\n".join(lines)


def remove_model(repo: str) -> int:
    """Delete ``repo`` from the cache (every revision); returns the bytes freed."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")
    if not folder.is_dir():
        known = ", ".join(m.repo for m in cached_models()) or "none"
        raise FetchError(f"{repo} is not in the cache {cache_dir()} (cached: {known})")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    shutil.rmtree(folder)
    return size
