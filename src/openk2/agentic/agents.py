"""Agents: a system prompt plus a tool subset (paper §3.1.1 "agents and tasks", spec §4.2).

The subset is programmatic: agents go round-robin over the repository's domains (a real server, an evolved
category/domain), each taking `min_tools..max_tools` tools of its domain, padded from the same category and then
from the rest when the domain is smaller; some also get the code tool. The LLM writes the system prompt (role and
style) from the tool list; a reply that is unusable (empty, too short, markup, JSON) is replaced by a template
prompt and the agent records why. All counts are ours (the paper: "thousands of agents").
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from openk2.agentic.config import AgentsSection
from openk2.agentic.llm import LLMOutputError, LLMRequestError
from openk2.agentic.simulate import is_code_tool
from openk2.agentic.tools import ToolSpec

MIN_PROMPT_CHARS, MAX_PROMPT_CHARS = 40, 2000


def tool_domain(tool: ToolSpec) -> str:
    """The domain a tool belongs to: "mcp/<server>", "<category>/<domain>" for an evolved tool, "code", or source."""
    if tool.source.startswith("mcp:"):
        return "mcp/" + tool.source.removeprefix("mcp:")
    if tool.source.startswith("synthetic:"):
        return tool.source.removeprefix("synthetic:") or "synthetic"
    if is_code_tool(tool):
        return "code"
    return tool.source or "other"


@dataclass(frozen=True)
class AgentDraft:
    """An agent before its prompt: id, domain and tool names (in repository order)."""

    agent_id: str
    domain: str
    tools: tuple[str, ...]


@dataclass(frozen=True)
class Agent:
    """A system prompt and the tools it may call; `prompt_source` is "llm" or "fallback" (then `note` says why)."""

    agent_id: str
    domain: str
    tools: tuple[str, ...]
    system_prompt: str
    prompt_source: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tools": list(self.tools)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Agent:
        return cls(**{**data, "tools": tuple(data["tools"])})


def draft_agents(tools: list[ToolSpec], config: AgentsSection, seed: int) -> list[AgentDraft]:
    """`config.count` tool subsets, deterministic in `seed`: round-robin over domains, 2-8 tools each by default."""
    code = [t for t in tools if is_code_tool(t)]
    plain = [t for t in tools if not is_code_tool(t)]
    if len(plain) < config.min_tools:
        raise ValueError(f"the repository has {len(plain)} non-code tools, fewer than agents.min_tools = "
                         f"{config.min_tools}")
    groups: dict[str, list[ToolSpec]] = {}
    for tool in plain:
        groups.setdefault(tool_domain(tool), []).append(tool)
    domains = sorted(groups)
    order = {t.name: i for i, t in enumerate(tools)}
    rng = random.Random(seed)
    drafts = []
    for i in range(config.count):
        domain = domains[i % len(domains)]
        own = groups[domain]
        k = rng.randint(config.min_tools, config.max_tools)
        chosen = rng.sample(own, min(k, len(own)))
        if len(chosen) < config.min_tools:  # a small domain: the same category first, then anything
            category = domain.split("/", 1)[0]
            near = [t for t in plain if t not in chosen and tool_domain(t).split("/", 1)[0] == category]
            far = [t for t in plain if t not in chosen and t not in near]
            rng.shuffle(near)
            rng.shuffle(far)
            chosen += (near + far)[:config.min_tools - len(chosen)]
        if code and rng.random() < config.code_tool_fraction:
            chosen.append(code[0])
        names = tuple(t.name for t in sorted(chosen, key=lambda t: order[t.name]))
        drafts.append(AgentDraft(f"agent-{i:04d}", domain, names))
    return drafts


def _prompt_request(draft: AgentDraft, tools: dict[str, ToolSpec]) -> list[dict[str, str]]:
    listing = "\n".join(f"- {name}: {tools[name].description.strip()[:200]}" for name in draft.tools)
    return [{"role": "system", "content": "You write system prompts for AI assistants."},
            {"role": "user", "content": f"Write the system prompt of an assistant that helps users with "
                                        f"{draft.domain.replace('/', ': ')}. It can call these tools:\n{listing}\n"
                                        "In 2 to 4 sentences starting with \"You are\", describe its role and its "
                                        "style. Reply with the system prompt only."}]


def clean_prompt(text: str) -> tuple[str | None, str]:
    """(the usable prompt, "") or (None, why it is unusable)."""
    text = re.sub(r"^\s*(system prompt|prompt)\s*:\s*", "", text.strip(), flags=re.I).strip().strip('"').strip()
    if len(text) < MIN_PROMPT_CHARS:
        return None, f"too short ({len(text)} chars)"
    if len(text) > MAX_PROMPT_CHARS:
        return None, f"too long ({len(text)} chars)"
    if "<|" in text or "```" in text or text.lstrip().startswith(("{", "[")):
        return None, "markup or JSON instead of prose"
    if len(text.split()) < 8:
        return None, "fewer than 8 words"
    return text, ""


def fallback_prompt(draft: AgentDraft, tools: dict[str, ToolSpec]) -> str:
    """The template prompt used when the LLM's is unusable."""
    names = ", ".join(draft.tools)
    return (f"You are a helpful assistant for {draft.domain.replace('/', ': ')}. You can call these tools: {names}. "
            "Use a tool whenever it gives a better answer than guessing, ask the user for details you are missing, "
            "and report the results clearly and briefly, including any errors the tools return.")


async def write_agent(llm: Any, draft: AgentDraft, tools: dict[str, ToolSpec], config: AgentsSection,
                      seed: int) -> Agent:
    """The LLM writes the agent's system prompt; a reply that is unusable falls back to the template (recorded)."""
    if llm is None:
        return Agent(draft.agent_id, draft.domain, draft.tools, fallback_prompt(draft, tools), "template",
                     "no LLM (llm.enabled = false)")
    try:
        reply = await llm.chat(_prompt_request(draft, tools), max_tokens=config.max_tokens, seed=seed,
                               stage="agents")
        prompt, why = clean_prompt(reply.content)
    except (LLMRequestError, LLMOutputError) as e:
        prompt, why = None, f"LLM failed: {e}"
    if prompt is None:
        return Agent(draft.agent_id, draft.domain, draft.tools, fallback_prompt(draft, tools), "fallback",
                     f"LLM prompt unusable: {why}")
    return Agent(draft.agent_id, draft.domain, draft.tools, prompt, "llm")
