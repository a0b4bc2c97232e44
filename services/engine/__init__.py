"""The selfspec engine: usable on its own, with no Ray, Redis or network."""

from services.engine.checkpoint import ModelLoadError
from services.engine.engine import Completion, Engine
from services.engine.params import DraftConfig, SamplingParams

__all__ = ["Completion", "DraftConfig", "Engine", "ModelLoadError", "SamplingParams"]
