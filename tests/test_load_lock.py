"""Model loads in several threads of one process (serve's sessions, several daemons in one
process): diffusers' init_empty_weights swaps nn.Module.register_parameter process-wide, so two
loads at once could leave it swapped and build every later model on the meta device."""

from __future__ import annotations

import threading

import torch


def test_loads_in_threads_leave_later_models_real(tiny_model):
    from daemon.remote.session import SharedModel
    from streamv2v import EngineConfig

    config = EngineConfig(vae="model", width=64, height=64, steps=1)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def load() -> None:
        try:
            start.wait()
            for _ in range(2):
                SharedModel.load(str(tiny_model), config, "cpu", None, False)
        except BaseException as err:  # (reported below)
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert torch.nn.Module.register_parameter.__qualname__ == "Module.register_parameter"
    later = torch.nn.Linear(2, 2)
    assert later.weight.device.type == "cpu"
