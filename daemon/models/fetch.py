"""Fetching the files an engine configuration needs (daemon/models/needs.py says which) from the
Hugging Face hub into its cache, resumable, with progress, and one clear error per failure.

The files go into the hub's own cache layout (``$HF_HOME/hub/models--org--name/{blobs,
snapshots,refs}``), so ``from_pretrained`` finds them offline afterwards exactly as if it had
downloaded them itself. The download is ours rather than ``hf_hub_download``'s because the
latter (huggingface_hub 2.x) writes each file to a temporary name unique to the process and
deletes it on failure: an interrupted multi-GB download would start again from zero. Here a
partial file keeps a stable name (``blobs/<etag>.incomplete``) and the next pull asks the
server for the rest only (an HTTP Range request).

Errors (:class:`~daemon.models.needs.FetchError`, exit code 2 on the CLI): no network, an
unknown repository (404), a gated or private one (401/403), a server that stalls (no byte for
``HF_HUB_DOWNLOAD_TIMEOUT`` s, 10 by default), and a disk too small (checked before the first
byte, against the whole plan).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from daemon.models.needs import FetchError, Need, select_files
from daemon.models.progress import DownloadProgress, human_bytes

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

log = logging.getLogger("streamv2v")

#: Kept free beyond what a pull needs (the disk check): a full disk breaks more than us.
DISK_MARGIN_BYTES = 64 * 2**20
_CHUNK = 64 * 1024  # written as it comes: a kill loses little


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    commit: str
    path: str
    size: int


@dataclass
class Plan:
    """What a pull fetches: the files not in the cache yet, and those already there."""

    files: list[RemoteFile] = field(default_factory=list)
    cached: list[RemoteFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def cache_dir() -> Path:
    """The hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _storage(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


# --------------------------------------------------------------------------- the local cache
def cached_listing(repo: str, revision: str = "main") -> tuple[str | None, dict[str, int]]:
    """The commit the cache holds for ``repo`` at ``revision`` and its files (path -> size)."""
    storage = _storage(repo)
    try:
        commit = (storage / "refs" / revision).read_text().strip()
    except OSError:
        return None, {}
    snapshot = storage / "snapshots" / commit
    files: dict[str, int] = {}
    for path in snapshot.rglob("*"):
        if path.is_file():  # (a symlink to a blob that exists)
            files[path.relative_to(snapshot).as_posix()] = path.stat().st_size
    return commit, files


def missing_from_cache(needs: Iterable[Need]) -> list[Need]:
    """The needs whose files are not all in the local cache (no network)."""
    missing = []
    for need in needs:
        _, files = cached_listing(need.repo)
        try:
            select_files(need, files)
        except FetchError:
            missing.append(need)
    return missing


# --------------------------------------------------------------------------- the hub
def _describe(err: Exception, what: str) -> FetchError:
    """One line for a failed hub call about ``what``."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    where = endpoint()
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        code = err.response.status_code
        if code == 404:
            return FetchError(f"{what}: not found on {where} (404): check the id")
        if code in (401, 403):
            return FetchError(
                f"{what}: access refused by {where} ({code}): the repository is gated or "
                "private; accept its terms on its page and log in (`hf auth login`, or set "
                "HF_TOKEN)"
            )
        return FetchError(f"{what}: {where} answered {code}; try again later")
    if isinstance(err, httpx2.TimeoutException):
        from huggingface_hub import constants

        return FetchError(
            f"{what}: {where} stalled (nothing for {constants.HF_HUB_DOWNLOAD_TIMEOUT:g} s; "
            "HF_HUB_DOWNLOAD_TIMEOUT sets it); run `streamv2v models pull` again to resume"
        )
    if isinstance(err, httpx2.TransportError):
        return FetchError(
            f"{what}: cannot reach {where} ({type(err).__name__}: {str(err) or 'no network'}): "
            "connect this machine, or run `streamv2v models pull` on one with a network and "
            "copy the cache (or give a local folder)"
        )
    return FetchError(f"{what}: {type(err).__name__}: {err}")


def plan(needs: Iterable[Need]) -> Plan:
    """Ask the hub for each need's files and sizes; split them into cached and to fetch."""
    from huggingface_hub import HfApi, constants

    if offline():
        raise FetchError(
            "HF_HUB_OFFLINE is set: nothing can be fetched; unset it, or copy the cache from a "
            "machine that ran `streamv2v models pull`"
        )
    api = HfApi()
    result = Plan()
    for need in needs:
        try:
            info = api.model_info(
                need.repo, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
        except Exception as err:
            raise _describe(err, f"{need.label} {need.repo}") from None
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or ()}
        storage = _storage(need.repo)
        for path in select_files(need, sizes):
            item = RemoteFile(need.repo, info.sha or "main", path, sizes[path])
            done = (storage / "snapshots" / item.commit / path).is_file()
            if item not in result.files and item not in result.cached:
                (result.cached if done else result.files).append(item)
    return result


def check_disk(plan: Plan) -> None:
    """Refuse to start a pull that will not fit (partial files already there count)."""
    need = plan.total_bytes - sum(_partial_bytes(repo) for repo in {f.repo for f in plan.files})
    where = cache_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + DISK_MARGIN_BYTES > free:
        raise FetchError(
            f"not enough disk space in {where}: the models need {human_bytes(need)} more, "
            f"{human_bytes(free)} is free; free some space, or point HF_HOME at a larger disk"
        )


def _partial_bytes(repo: str) -> int:
    """Bytes the partial files of an earlier, interrupted pull of ``repo`` hold."""
    blobs = _storage(repo) / "blobs"
    try:
        return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
    except OSError:
        return 0


def pull(needs: Iterable[Need], progress: DownloadProgress) -> Plan:
    """Fetch every file ``needs`` reads that the cache lacks; returns the plan it ran."""
    todo = plan(list(needs))
    check_disk(todo)
    progress.begin(todo.total_bytes, len(todo.files))
    try:
        for i, item in enumerate(todo.files, 1):
            progress.file(f"{item.repo}/{item.path}", item.size, i)
            fetch_file(item, progress)
        for repo, commit in {(f.repo, f.commit) for f in todo.files + todo.cached}:
            _write_ref(repo, commit)
    finally:
        progress.end()
    return todo


def fetch_file(item: RemoteFile, progress: DownloadProgress) -> Path:
    """One file into the cache: resumed from its partial blob when one is there."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    what = f"{item.repo}/{item.path}"
    url = hf_hub_url(item.repo, item.path, revision=item.commit)
    try:
        meta = get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:
        raise _describe(err, what) from None
    if not meta.etag:
        raise FetchError(f"{what}: the server gave no ETag; it is not a Hugging Face hub")
    storage = _storage(item.repo)
    blob = storage / "blobs" / meta.etag
    pointer = storage / "snapshots" / item.commit / item.path
    if not blob.is_file():
        from huggingface_hub.utils import WeakFileLock

        # The lock huggingface_hub takes for this blob: a concurrent pull, the daemon's first
        # run or hf_hub_download never write the same file at once.
        lock = cache_dir() / ".locks" / storage.name / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not blob.is_file():
                _download(item, url, meta, blob, progress)
    _link(blob, pointer)
    return pointer


def _download(
    item: RemoteFile, url: str, meta: HfFileMetadata, blob: Path, progress: DownloadProgress
) -> None:
    """The blob's bytes, appended to its partial file from where that ends (a Range request),
    then moved into place."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers

    what = f"{item.repo}/{item.path}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    size = meta.size if meta.size is not None else item.size
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    progress.advance(have)  # what an earlier pull fetched counts as done
    headers = build_hf_headers()
    # As huggingface_hub does: Xet-stored files through the hub's own URL; others straight
    # from where the HEAD was sent (a signed CDN address that gets no token).
    target = url if meta.xet_file_data is not None else (meta.location or url)
    if urlsplit(target).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with get_session().stream(
            "GET",
            target,
            headers=headers,
            follow_redirects=True,
            timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
        ) as response:
            if response.status_code >= 400:
                from huggingface_hub.errors import HfHubHTTPError

                raise HfHubHTTPError(f"{response.status_code}", response=response)
            mode = "ab" if have and response.status_code == 206 else "wb"
            if mode == "wb" and have:
                progress.advance(-have)  # the server ignored the Range: start over
            with partial.open(mode) as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    progress.advance(len(chunk))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FetchError(
                f"{what}: the disk is full ({cache_dir()}); free some space, or point "
                "HF_HOME at a larger disk, then run `streamv2v models pull` again"
            ) from None
        raise FetchError(f"{what}: cannot write {partial}: {err}") from None
    except FetchError:
        raise
    except Exception as err:
        raise _describe(err, what) from None
    got = partial.stat().st_size
    if got != size:
        raise FetchError(
            f"{what}: got {got} of {size} bytes; run `streamv2v models pull` again to resume"
        )
    os.replace(partial, blob)


def _link(blob: Path, pointer: Path) -> None:
    """The snapshot entry for a blob: a relative symlink, as huggingface_hub makes (a copy
    where the filesystem has no symlinks)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_file():
        return
    pointer.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        shutil.copyfile(blob, pointer)


def _write_ref(repo: str, commit: str, revision: str = "main") -> None:
    ref = _storage(repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{revision}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def ensure_cached(
    needs: Iterable[Need], progress: DownloadProgress, optional: Iterable[Need] = ()
) -> Plan | None:
    """The daemon's first run: fetch what the cache lacks (nothing, and no network call, when
    every file is there). A model that is missing while offline fails at once, in one line.

    ``optional`` (what the other presets read) is fetched in the same pull when it can be; when
    it cannot, that is said in the log and only ``needs`` are fetched (a preset whose LoRA is
    gated fails when chosen, not the daemon's start)."""
    needs = list(needs)
    optional = [n for n in optional if n not in needs]
    if optional and not offline():
        try:
            return ensure_cached(needs + optional, progress)
        except FetchError as err:
            log.warning("models: %s; a preset that needs it fails when chosen", err)
    missing = missing_from_cache(needs)
    if not missing:
        return None
    names = ", ".join(f"{n.label} {n.repo}" for n in missing)
    if offline():
        raise FetchError(
            f"{names}: not in the local cache ({cache_dir()}) and HF_HUB_OFFLINE is set: run "
            "`streamv2v models pull` on a machine with a network and copy the cache, or give "
            "a local folder"
        )
    try:
        return pull(missing, progress)
    except FetchError as err:
        raise FetchError(f"not in the local cache: {err}") from None
