"""What ``serve`` loads besides the model, on demand of its sessions, and frees when unused.

ControlNets (one per distinct model) and their preprocessors (one per distinct preprocessing:
a depth preprocessor holds its depth model) are loaded when the first session naming them
starts, shared by every session that names them as the UNet is, and freed when the last of them
ends or moves to other ControlNets. Each session builds its own :class:`ControlStream` of the
shared modules (its own scales and control rows). Style LoRAs live in the shared weights'
adapter library; :class:`LoraUsers` counts which sessions named each, so the last session
naming one frees it. Everything here runs on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from daemon.models.load_lock import LOAD_LOCK
from streamv2v import ControlSpec

log = logging.getLogger("streamv2v.serve")


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (0 for anything else)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Held:
    value: Any
    nbytes: int
    users: set[int] = field(default_factory=set)


def _preprocess_key(spec: ControlSpec) -> str:
    """What makes two specs' preprocessors the same (all but the ControlNet, name and scale)."""
    return spec.model_copy(update={"model": "", "name": "", "scale": 0.0}).model_dump_json()


class ControlShelf:
    """The ControlNets and preprocessors the sessions use, loaded once per distinct one."""

    def __init__(self, unet: Any, allow_pickle: bool = False) -> None:
        self.unet = unet
        self.allow_pickle = allow_pickle
        self.nets: dict[str, _Held] = {}  # ControlNet location -> the net
        self.preprocessors: dict[str, _Held] = {}  # preprocessing settings -> the callable

    def acquire(self, owner: int, specs: Sequence[ControlSpec]) -> Any:
        """The ControlStream for ``specs`` (None: no ControlNet), loading what no session has
        loaded yet; ``owner`` holds each until :meth:`release`. Raises what loading raises
        (nothing is held then)."""
        if not specs:
            return None
        from streamv2v.control import ControlStream

        nets, preps, taken = [], [], []
        try:
            for spec in specs:
                net = self._take(self.nets, spec.model, owner, lambda s=spec: self._load_net(s))
                taken.append((self.nets, spec.model))
                key = _preprocess_key(spec)
                prep = self._take(self.preprocessors, key, owner, lambda s=spec: self._prep(s))
                taken.append((self.preprocessors, key))
                nets.append(net)
                preps.append(prep)
        except Exception:
            for table, key in taken:
                self._drop(table, key, owner)
            raise
        return ControlStream(nets, preps, specs)

    def release(self, owner: int) -> list[str]:
        """``owner`` uses none of them any more; returns the ControlNets that were freed."""
        freed = [key for key, held in self.nets.items() if held.users == {owner}]
        for table in (self.nets, self.preprocessors):
            for key in list(table):
                self._drop(table, key, owner)
        if freed:
            log.info("ControlNet freed (no session uses it): %s", ", ".join(freed))
        return freed

    def _take(self, table: dict[str, _Held], key: str, owner: int, load: Any) -> Any:
        held = table.get(key)
        if held is None:
            value = load()
            # A ControlNet is a module; a depth preprocessor holds one (its depth model).
            module = value if isinstance(value, torch.nn.Module) else getattr(value, "model", None)
            held = table[key] = _Held(value, module_bytes(module))
        held.users.add(owner)
        return held.value

    def _drop(self, table: dict[str, _Held], key: str, owner: int) -> None:
        held = table.get(key)
        if held is not None:
            held.users.discard(owner)
            if not held.users:
                del table[key]

    def _load_net(self, spec: ControlSpec) -> Any:
        from streamv2v.control import load_control

        # The net alone (its preprocessor is the shelf's own, shared per settings).
        alone = spec.model_copy(update={"preprocess": "image", "depth_model": None})
        with LOAD_LOCK:  # (one load at a time in a process: see load_lock)
            net = load_control([alone], self.unet, allow_pickle=self.allow_pickle).nets[0]
        log.info("ControlNet %s loaded: %.1f MB", spec.model, module_bytes(net) / 1e6)
        return net

    def _prep(self, spec: ControlSpec) -> Any:
        from streamv2v.preprocess import make_preprocessor

        u = self.unet
        with LOAD_LOCK:  # (a depth model is a from_pretrained too)
            return make_preprocessor(
                spec, device=u.device, dtype=u.dtype, allow_pickle=self.allow_pickle
            )

    def figures(self) -> dict[str, Any]:
        """What is loaded, its bytes and how many sessions use it (/health, /metrics)."""
        return {
            "controlnets": {
                k: {"bytes": h.nbytes, "sessions": len(h.users)} for k, h in self.nets.items()
            },
            "preprocessors": {
                k: {"bytes": h.nbytes, "sessions": len(h.users)}
                for k, h in self.preprocessors.items()
            },
        }


class LoraUsers:
    """Which sessions named each style LoRA; the last one to end frees it."""

    def __init__(self) -> None:
        self.users: dict[str, set[int]] = {}

    def add(self, owner: int, names: Iterable[str]) -> None:
        for name in names:
            self.users.setdefault(name, set()).add(owner)

    def release(self, owner: int) -> set[str]:
        """``owner`` ended: returns the LoRAs no session names any more (to free)."""
        unused = set()
        for name, users in list(self.users.items()):
            users.discard(owner)
            if not users:
                del self.users[name]
                unused.add(name)
        return unused

    def named(self) -> set[str]:
        return set(self.users)
