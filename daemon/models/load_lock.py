"""One model load at a time in a process.

diffusers builds a model under accelerate's ``init_empty_weights``, which swaps
``nn.Module.register_parameter`` for the whole process, not per thread, and puts back what it
found on entry. Two loads at once (``serve``'s sessions, the engine loader beside a ControlNet
or depth load, several daemons in one process) can end with the swapped version put back for
good: every later model of the process is then built on the meta device ("Cannot copy out of
meta tensor"). Loading takes seconds; frames never wait on this lock."""

from __future__ import annotations

import threading

#: Held around every ``from_pretrained`` of the daemon and ``serve`` (re-entrant: a load may
#: load its parts).
LOAD_LOCK = threading.RLock()
