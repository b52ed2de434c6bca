"""The one place openk2 imports bfcl-eval: its AST checker, its type map and its data folder (issue 7, BFCL).

bfcl-eval's `ast_checker` module imports `bfcl_eval.constants.model_config` for a single lookup
(`MODEL_CONFIG_MAPPING[name].underscore_to_dot`), and that module imports every vendor's model handler and so
every vendor SDK (anthropic, cohere, google-genai, mistralai, qwen-agent, tree-sitter, ...). The checker itself
needs only the standard library. So before importing it we put a minimal stand-in for `model_config` in
`sys.modules` holding one entry, for the model name our scorer passes. The entry says "names are not rewritten":
`openk2.eval.bfcl` maps the underscored tool names it sent (OpenAI's name pattern has no dots) back to BFCL's dotted
names itself, so the checker compares BFCL names with BFCL names. Nothing else of bfcl-eval is imported, and no
other openk2 module imports bfcl-eval (BFCL is for measuring only: its items stay inside `openk2.eval`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKER_MODEL_NAME = "openk2"  # the model name the checker receives; the stand-in's only key
_MODEL_CONFIG = "bfcl_eval.constants.model_config"


@dataclass(frozen=True)
class _NamesKept:
    """What the checker reads of a BFCL ModelConfig: whether it should rewrite '.' to '_' in expected names."""

    underscore_to_dot: bool = False


@dataclass(frozen=True)
class BfclPackage:
    """The pieces of the installed bfcl-eval package that openk2 uses."""

    ast_checker: Callable[..., dict[str, Any]]  # ast_checker(functions, decoded, possible_answer, language, cat, model)
    python: Any  # bfcl_eval.constants.enums.Language.PYTHON
    gorilla_to_openapi: dict[str, str]  # BFCL type names (dict, float, tuple, any, ...) -> JSON Schema types
    data_dir: Path  # BFCL_v4_<category>.json and possible_answer/


def load_bfcl() -> BfclPackage:
    """Import bfcl-eval's AST checker with the model registry stood in for (see the module docstring)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bfcl-eval package is not installed (pip install --no-deps bfcl-eval)")
    if _MODEL_CONFIG in sys.modules:  # the real registry (a full install imported it): add our name to it
        sys.modules[_MODEL_CONFIG].MODEL_CONFIG_MAPPING.setdefault(CHECKER_MODEL_NAME, _NamesKept())
    else:
        stand_in = types.ModuleType(_MODEL_CONFIG, "openk2's stand-in: the AST checker reads one flag from it")
        stand_in.MODEL_CONFIG_MAPPING = {CHECKER_MODEL_NAME: _NamesKept()}
        sys.modules[_MODEL_CONFIG] = stand_in

    from bfcl_eval.constants.enums import Language
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return BfclPackage(ast_checker=ast_checker, python=Language.PYTHON, gorilla_to_openapi=dict(GORILLA_TO_OPENAPI),
                       data_dir=Path(spec.submodule_search_locations[0]) / "data")
