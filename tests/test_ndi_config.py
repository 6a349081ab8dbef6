"""The NDI settings without NDI running: the camera source form, the output section, doctor."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from daemon.config import DaemonConfig
from daemon.dataplane.camera import describe_source
from daemon.dataplane.ndi import _matches, ndi_problem
from daemon.doctor import check_ndi


def test_ndi_sources_and_the_output_section():
    config = DaemonConfig.model_validate(
        {"camera": {"source": "ndi:OBS"}, "output": {"ndi": {"enabled": True, "name": "me"}}}
    )
    assert config.camera.source_kind() == "ndi"
    assert describe_source(config.camera.source) == "NDI source OBS"
    assert config.output.ndi.enabled and config.output.ndi.name == "me"
    assert not DaemonConfig().output.ndi.enabled  # off unless asked for
    with pytest.raises(ValidationError, match="ndi:NAME"):
        DaemonConfig.model_validate({"camera": {"source": "ndi: "}})
    assert _matches("STUDIO-PC (OBS)", "OBS") and _matches("STUDIO-PC (OBS)", "STUDIO-PC (OBS)")
    assert not _matches("STUDIO-PC (OBS 2)", "OBS")


def test_doctor_reports_the_extra():
    uses = DaemonConfig.model_validate({"output": {"ndi": {"enabled": True}}})
    (check,) = check_ndi(uses)
    if ndi_problem() is None:
        assert check.status == "OK" and "cyndilib" in check.detail
    else:
        assert check.status == "FAIL" and "streamv2v[ndi]" in check.fix
    (unused,) = check_ndi(DaemonConfig())
    assert unused.status == "OK"
