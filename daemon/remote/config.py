"""The ``[engine]`` keys that move the engine to a ``streamv2v serve`` on another machine.

They live here, not in daemon/config.py, so the remote engine's settings sit with its code;
:class:`RemoteEngineFields` is mixed into the ``[engine]`` section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, field_validator


class RemoteEngineFields(BaseModel):
    """``remote = "http://HOST:PORT"`` sends the camera to that server's engine; the token comes
    from the environment variable ``token_env``, else the first line of ``token_file``."""

    remote: str | None = Field(
        None, description="URL of a `streamv2v serve` (http://HOST:PORT); unset: engine runs here."
    )
    token_file: Annotated[Path, AfterValidator(Path.expanduser)] | None = None
    token_env: str | None = None

    @field_validator("remote", mode="before")
    @classmethod
    def _check_remote(cls, value: Any) -> Any:
        if value is None or value == "":  # TOML has no null: "" runs the engine here
            return None
        if not isinstance(value, str):
            return value  # pydantic names the type
        parts = urlsplit(value.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(
                f"remote must be http://HOST:PORT (the address `streamv2v serve` prints), "
                f"got {value!r}"
            )
        if parts.username or parts.password or parts.query or parts.path not in ("", "/"):
            raise ValueError(
                "remote is only http://HOST:PORT: put the token in engine.token_file or "
                "engine.token_env, never in the URL"
            )
        return f"{parts.scheme}://{parts.netloc}"

    def resolve_token(self) -> str:
        """The token ("" for none); ValueError names the key that points nowhere."""
        if self.token_env:
            value = os.environ.get(self.token_env)
            if value is None:
                raise ValueError(
                    f"engine.token_env = {self.token_env!r}: that environment variable is not "
                    "set; export it or set engine.token_file"
                )
            return value.strip()
        if self.token_file is not None:
            # Here, not at the top: the protocol module needs the `remote` extra (aiortc), and
            # this config is read with or without it.
            from daemon.remote.protocol import read_token_file

            try:
                return read_token_file(self.token_file)
            except OSError as exc:
                raise ValueError(
                    f"engine.token_file = {str(self.token_file)!r}: cannot read it "
                    f"({exc.strerror or exc}); fix the path or its permissions"
                ) from None
        return ""
