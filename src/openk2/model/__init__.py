"""The K2 model (paper §2.3): config, modules, hub-layout checkpoints."""

from openk2.model.config import ModelConfig, preset
from openk2.model.model import CausalLMOutput, K2ForCausalLM

__all__ = ["CausalLMOutput", "K2ForCausalLM", "ModelConfig", "preset"]
