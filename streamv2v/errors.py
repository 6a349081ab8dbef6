"""Errors that tell the user what went wrong and what to do about it."""

from __future__ import annotations


class StreamV2VError(Exception):
    """Base class of the engine's own errors."""


class ModelLoadError(StreamV2VError):
    """A model (or VAE, or LoRA) could not be loaded; the message names it and how to fetch it."""


class UnsafeWeightsError(ModelLoadError):
    """Only pickle (.bin/.ckpt/.pt) weights were found and the user did not opt in to them."""
