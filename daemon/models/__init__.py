"""Below the rooms: what a model name points to (the registry of built-in models and hub ids or
folders) and the one ``engine_config`` that turns settings into an ``EngineConfig``. The data plane,
the remote engine, the offline commands, the doctor and the CLI import from here; nothing here
imports a room."""
