"""Styles: what a style is and how it changes. Preset files and the preset library, the
PresetManager (many voices, one owner), blended switching between styles. The control plane
(daemon/control/) only serves this over HTTP."""
