"""Evaluation (paper §4): BFCL's non-live AST categories and tool-call quality on any OpenAI-compatible endpoint.

BFCL items are for measuring only: they are read inside this package and go into no other stage's data or prompts.
"""

from openk2.eval.bfcl import CATEGORIES, BfclReport, evaluate_bfcl
from openk2.eval.tool_calls import Endpoint, ToolCallPrompt, ToolCallQuality, evaluate_tool_calls, load_prompts

__all__ = ["CATEGORIES", "BfclReport", "Endpoint", "ToolCallPrompt", "ToolCallQuality", "evaluate_bfcl",
           "evaluate_tool_calls", "load_prompts"]
