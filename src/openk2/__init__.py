"""openk2: the Kimi K2 recipe ("Kimi K2: Open Agentic Intelligence", arXiv 2507.20534) as software."""

from openk2.model import CausalLMOutput, K2ForCausalLM, ModelConfig, preset

__version__ = "0.1.0"
__all__ = ["CausalLMOutput", "K2ForCausalLM", "ModelConfig", "preset", "__version__"]
