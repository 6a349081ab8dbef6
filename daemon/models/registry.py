"""The built-in models and where a model name points: the registry the daemon, the doctor, the
offline pipeline and the benches share.

``tiny`` is a random-weight model built into the user cache on first use (it shows the pipeline,
not a style); ``tiny-styles`` is a tiny model trained on synthetic scenes in four styles, shipped
inside the package (see streamv2v/tiny/styles.py). ``tiny-canny`` is a canny ControlNet trained
for it (streamv2v/tiny/control.py), a control model name. Any other name is a hub id or a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from daemon.config import DEFAULT_MODEL
from daemon.errors import PROG, UserError

#: The special model name for the embedded random-weight model (works offline, makes noise).
TINY_MODEL = "tiny"
#: The tiny model TRAINED on synthetic scenes in four styles, shipped with the package: the
#: embedded default where no real model is at hand (see streamv2v/tiny/styles.py).
TINY_STYLES = "tiny-styles"
#: The tiny SDXL-family model TRAINED on the same scenes (streamv2v/tiny/sdxl.py), shipped too.
TINY_SDXL = "tiny-sdxl"
BUILTIN_MODELS = (TINY_MODEL, TINY_STYLES, TINY_SDXL)
#: SDXL-family pipelines the README's recipes name: their family (and so their VAE, TAESDXL)
#: is known before anything is downloaded. Other models: from their model_index.json.
SDXL_MODELS = (
    "stabilityai/sdxl-turbo",
    "stabilityai/stable-diffusion-xl-base-1.0",
)
#: The tiny canny ControlNet TRAINED for the style model, shipped with the package (see
#: streamv2v/tiny/control.py): a control model name, resolved like the built-in models.
TINY_CANNY = "tiny-canny"
#: The size the built-in style model was trained at (its default working size).
TINY_STYLES_SIZE = 128
#: The prompts the built-in style model knows (streamv2v.scenes.STYLES).
STYLE_PROMPTS = ("a plain scene", "a warm scene", "a cool striped scene", "an outline drawing")


def tiny_model_dir() -> Path:
    """The embedded tiny model's folder in the user cache, built on first use."""
    from platformdirs import user_cache_dir

    from streamv2v import testing

    folder = Path(user_cache_dir(PROG)) / "tiny-model"
    stamp = folder / ".streamv2v-build"
    # The stamp is written last and names the code that built the model, so a cached model is
    # used only if complete and made by the current builder (its layout may change between
    # versions).
    builder = hashlib.sha256(Path(testing.__file__).read_bytes()).hexdigest()[:16]
    if stamp.is_file() and stamp.read_text().strip() == builder:
        return folder
    print(f"{PROG}: building the tiny model in {folder} (once)", file=sys.stderr)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the final place and move it in, so an interrupted build never leaves a
        # half-written folder that later runs would trust.
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix="tiny-model-build-") as tmp:
            built = testing.save_tiny_model(Path(tmp) / "model")
            (built / stamp.name).write_text(builder)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # a concurrent build may have moved in first
                os.replace(built, folder)
    except OSError as err:
        raise UserError(f"cannot build the tiny model in {folder}: {err}") from None
    if not stamp.is_file():
        raise UserError(f"cannot build the tiny model in {folder}: it was not moved into place")
    return folder


def tiny_styles_dir() -> Path:
    """The trained tiny style model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("streamv2v"))) / "models" / "tiny-styles"


def tiny_styles_available() -> bool:
    return (tiny_styles_dir() / "model_index.json").is_file()


def tiny_canny_dir() -> Path:
    """The trained tiny canny ControlNet shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("streamv2v"))) / "models" / TINY_CANNY


def tiny_canny_available() -> bool:
    return (tiny_canny_dir() / "config.json").is_file()


def tiny_sdxl_dir() -> Path:
    """The trained tiny SDXL-family model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("streamv2v"))) / "models" / TINY_SDXL


def model_family(model: str):
    """The family (streamv2v.families) of ``model``: from its ``model_index.json`` when it is on
    disk (a folder, a built-in model, or a hub id in the cache), else from the known names;
    SD1.5/SD2.1 when unknown (the loader reads the UNet's config and knows for sure)."""
    import json

    from huggingface_hub import try_to_load_from_cache

    from streamv2v.families import SD, SDXL, family_of_index

    if model in SDXL_MODELS or model == TINY_SDXL:
        return SDXL
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file() and model.count("/") == 1:
        cached = try_to_load_from_cache(model, "model_index.json")
        index = Path(cached) if isinstance(cached, str) else index
    try:
        return family_of_index(json.loads(index.read_text()))
    except (OSError, ValueError):
        return SD


def control_location(model: str) -> str:
    """What to hand to ControlNetModel.from_pretrained for a control ``model`` name: the
    built-in ``tiny-canny`` is the package's folder; any other name is a hub id or a folder."""
    if model != TINY_CANNY:
        return model
    if not tiny_canny_available():
        raise UserError(
            f"the built-in ControlNet is missing from this installation ({tiny_canny_dir()}): "
            "reinstall streamv2v, or train one with `python -m streamv2v.tiny.control --out "
            "DIR` and pass that folder as the control model"
        )
    return str(tiny_canny_dir())


def model_location(model: str) -> str:
    """What to hand to from_pretrained for ``model``; builds the tiny model when asked for."""
    if model == TINY_SDXL:
        if not (tiny_sdxl_dir() / "model_index.json").is_file():
            raise UserError(
                f"the built-in SDXL model is missing from this installation ({tiny_sdxl_dir()}):"
                " reinstall streamv2v, or train one with `python -m streamv2v.tiny.sdxl --out "
                "DIR` and pass that folder as the model"
            )
        return str(tiny_sdxl_dir())
    if model == TINY_STYLES:
        if not tiny_styles_available():
            raise UserError(
                f"the built-in style model is missing from this installation ({tiny_styles_dir()}):"
                " reinstall streamv2v, or train one with `python -m streamv2v.tiny.styles --out "
                "DIR` and pass that folder as the model"
            )
        return str(tiny_styles_dir())
    if model != TINY_MODEL:
        return model
    from streamv2v.testing import TINY_MODEL_NOTE

    print(f"{PROG}: note: {TINY_MODEL_NOTE}", file=sys.stderr)
    return str(tiny_model_dir())


def default_model() -> str:
    """SD1.5 when its weights are in the local cache; else the built-in style model (the
    embedded default: it works offline on any machine), said on stderr."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(DEFAULT_MODEL, "model_index.json"), str):
        return DEFAULT_MODEL
    print(
        f"{PROG}: note: {DEFAULT_MODEL} is not in the local cache: using the built-in tiny "
        f"style model ({TINY_STYLES}; it knows only synthetic shapes and 4 styles). Pass --model "
        "to choose another.",
        file=sys.stderr,
    )
    return TINY_STYLES
