"""Serving K2 models (spec §1): the generation engine with an absorbed-MLA latent cache, and sampling."""

from openk2.serve.engine import Completion, Engine, LatentCache
from openk2.serve.sampling import SamplingParams

__all__ = ["Completion", "Engine", "LatentCache", "SamplingParams"]
