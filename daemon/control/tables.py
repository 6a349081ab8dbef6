"""The running daemon's figures and its presets as compact terminal tables (``streamv2v status``
and ``streamv2v presets``), from the same dictionaries the control API answers with."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def preset_table(listing: dict[str, Any], running: bool) -> tuple[list[str], list[str]]:
    """The rows of a preset listing (GET /presets) and its file errors, as lines; the active
    preset is marked with * only when ``running`` (the daemon answered)."""
    rows = listing["presets"]
    width = max(len(r["name"]) for r in rows)
    keys = max([len(r["hotkey"] or "") for r in rows] + [6])
    lines = []
    for r in rows:
        mark = "*" if r["active"] and running else " "
        what = "(camera unchanged) " if r["passthrough"] else ""
        what += "(BROKEN: see the errors) " if r.get("error") else ""
        if r.get("mask", "none") != "none":
            what += f"[styles only the {r['mask']}] "
        scenes = f"  [OBS: {', '.join(r['obs_scenes'])}]" if r["obs_scenes"] else ""
        line = f"{mark} {r['name']:<{width}}  {r['hotkey'] or '-':<{keys}}  {what}"
        lines.append(f"{line}{r['description']}{scenes}{lora_sizes(r)}".rstrip())
    base = listing.get("lora_base_bytes")
    if base:
        lines.append(f"  (LoRA base copies, all presets together: {megabytes(base)})")
    errors = [
        f"error: {error}" if file in error else f"error: {file}: {error}"
        for file, error in listing["errors"].items()
    ]
    return lines, errors


def megabytes(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 2**20:.1f} MiB"


def lora_sizes(row: dict[str, Any]) -> str:
    """A preset row's LoRAs with the memory each one's factors take: ``[LoRA name 1.2 MB]``."""
    loras = row.get("loras") or []
    named = [
        f"{Path(lora['weight_name'] or lora['id']).name} {megabytes(lora.get('bytes'))}"
        for lora in loras
    ]
    return f"  [LoRA {', '.join(named)}]" if named else ""


def status_table(s: dict[str, Any]) -> str:
    """The figures of GET /status as a compact table."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    def num(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    state = s["state"]
    steps = "-" if s["steps"] is None else f"{s['steps']}{' (stream batch)' * s['stream_batch']}"
    control = s["controller"]
    if control["active"]:
        budget = "" if s["latency_budget_ms"] is None else f", budget {s['latency_budget_ms']:g} ms"
        fps = "" if s["target_fps"] is None else f", target {s['target_fps']:g} fps"
        why = f"; last change: {control['reason']}" if control["reason"] else ""
        steps += f"   predicted p95 {ms(control['predicted_p95_ms'])}{budget}{fps}{why}"
    else:
        steps += "   (fixed: latency controller off)"
    fps, lat, kinds, bank, dev = s["fps"], s["latency_ms"], s["kinds"], s["bank"], s["device"]
    memory = "" if dev["memory_bytes"] is None else f", {dev['memory_bytes'] / 2**30:.2f} GiB used"
    rows = [
        ("preset", f"{s['preset']}{'  (switching)' * s['switching']}"),
        ("state", "   ".join(f"{part} {value}" for part, value in state.items())),
        ("steps", steps),
        (
            "fps",
            f"input {num(fps['input'])}   engine {num(fps['engine'])}   "
            f"output {num(fps['output'])}",
        ),
        (
            "latency",
            f"p50 {ms(lat['p50'])}   p95 {ms(lat['p95'])}   p99 {ms(lat['p99'])}   "
            f"deadline misses {s['deadline_misses']}",
        ),
        (
            "frames",
            f"published {s['published']}   styled {kinds.get('styled', 0)}   "
            f"passthrough {kinds.get('passthrough', 0)}   "
            f"dropped input {s['dropped_input_frames']}",
        ),
        (
            "bank",
            f"{bank['bytes'] / 2**20:.1f} MB, {bank['tokens']} tokens"
            if bank["enabled"]
            else "off",
        ),
        ("device", f"{dev['name'] or '-'} {dev['dtype'] or ''}{memory}".rstrip()),
    ]
    degraded = s.get("degraded")
    if degraded:  # lowered after out-of-memory errors
        rows.insert(2, ("degraded", degraded["reason"]))
    ready = s.get("getting_ready")
    if ready:
        from daemon.models.progress import describe

        rows.insert(2, ("ready", describe(ready)))
    loras = s.get("loras") or {}
    if loras.get("loaded"):
        rows.append(
            (
                "style LoRAs",
                f"{loras['loaded']} loaded, {loras['bytes'] / 2**20:.1f} MB "
                f"+ base copies {loras['base_bytes'] / 2**20:.1f} MB",
            )
        )
    mask = s.get("mask")
    if mask and mask["mode"] != "none":
        rows.append(
            (
                "mask",
                f"styles only the {mask['mode']}   segmenter {ms(mask['segment_ms_p50'])}   "
                f"composite {ms(mask['composite_ms_p50'])}   missed {mask['missed']}",
            )
        )
    remote = s.get("remote")
    if remote:
        error = f" ({remote['error']})" if remote["error"] else ""
        if remote.get("problem"):  # e.g. "the engine on http://... fails: ..."
            rows.append(("problem", remote["problem"]))
        rows.append(
            (
                "remote",
                f"{remote['url']} {remote['state']}{error}   round trip "
                f"{ms(remote['rtt_ms_p50'])}   server {ms(remote['server_ms_p50'])}/frame",
            )
        )
    return "\n".join(f"{name:<8} {value}" for name, value in rows)
