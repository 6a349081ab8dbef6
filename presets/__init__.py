"""The bundled style presets (TOML files), installed with the package; see
daemon/styles/presets.py."""
