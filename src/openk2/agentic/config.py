"""The typed config of `openk2 synth` (paper §3.1.1, spec §4): tools, agents, tasks, episodes, judge, LLM, simulator.

Loaded from TOML with `openk2.config.load_config` (unknown keys and wrong types are errors). The defaults are the
tiny run of `configs/synth_tiny.toml`, small enough for SmolLM2 on two CPU cores; every number here is ours, the
paper publishes none (K2 itself used 3000+ real and 20,000+ synthetic tools and thousands of agents).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openk2.agentic.evolve import EvolveConfig
from openk2.agentic.llm import LLMConfig
from openk2.agentic.simulate import SimulatorConfig
from openk2.config import load_config

MCP_SERVERS = ("time", "git", "sqlite")  # the servers `openk2.agentic.mcp.builtin_servers` knows how to start
# Real tools that change the server's shared state (the database, the repository): a gold plan run against them
# once could not be replayed in its episode, so agents do not get them unless the config asks.
WRITING_MCP_TOOLS = ("write_query", "create_table", "append_insight", "git_commit", "git_add", "git_reset",
                     "git_create_branch", "git_checkout", "git_init")
DEFAULT_PERSONAS = (
    "a busy small-business owner who writes short, direct messages",
    "a retired teacher who is polite, careful and asks for confirmation",
    "a university student who is curious and writes casually",
    "a software engineer who is precise and impatient with vague answers",
    "a travel blogger who is friendly and chatty",
    "a non-native English speaker who writes simple sentences",
    "a project manager who wants clear summaries and next steps",
    "a skeptical journalist who double-checks every number",
)
# Real values for the real tools' parameters (the schema sampler would invent a time zone "timezone-3fa2b1") and
# programs for the code tool; keys are "tool.param" or "param".
DEFAULT_VALUE_POOLS = {
    "timezone": ["Asia/Tokyo", "Europe/Paris", "America/New_York", "Australia/Sydney", "Africa/Nairobi"],
    "source_timezone": ["Europe/London", "Asia/Kolkata", "America/Los_Angeles"],
    "target_timezone": ["Asia/Singapore", "Europe/Berlin", "America/Sao_Paulo"],
    "convert_time.time": ["09:30", "14:00", "18:45"],
    "read_query.query": ["SELECT sqlite_version() AS version", "SELECT 6 * 7 AS answer",
                         "SELECT name FROM sqlite_master WHERE type = 'table'"],
    "describe_table.table_name": ["sqlite_master"],
    "run_python.code": ["print(sum(range(1, 101)))", "print(2 ** 20)", "print(round(3.14159 * 2, 3))",
                        "print(sorted([5, 3, 9, 1]))"],
}


@dataclass
class LLMSection(LLMConfig):
    """`LLMConfig` with the tiny run's defaults, so a config sets only what it changes."""

    base_url: str = "http://127.0.0.1:8000/v1"  # `openk2 serve`'s default address
    model: str = "auto"  # ask the server's /models which model it serves (ours serves exactly one)
    max_concurrency: int = 64  # as many requests as episodes in flight: the server batches them
    timeout_s: float = 600.0  # a CPU server with 64 requests queued answers slowly
    max_tokens: int = 256
    cache_dir: str | None = "runs/synth-cache"  # shared by runs: a rerun of the same requests costs nothing
    # False: no LLM at all, every text from its template (system prompts, requests from the catalog's asks, final
    # answers); needs tools.synthetic = false, judge.llm = false, episodes.assistant = "gold" and one user turn
    enabled: bool = True


def _tiny_evolve() -> EvolveConfig:
    return EvolveConfig(categories=["travel", "finance"], domains_per_category=1, tools_per_domain=4)


@dataclass
class ToolsSection:
    """Where the tool repository comes from: a JSONL file, or real MCP servers plus evolved synthetic tools."""

    path: str | None = None  # a tools JSONL (ToolSpec lines) used instead of harvesting and evolving
    mcp_servers: list[str] = field(default_factory=lambda: ["time", "sqlite"])  # of MCP_SERVERS
    exclude: list[str] = field(default_factory=lambda: list(WRITING_MCP_TOOLS))  # tool names left out
    synthetic: bool = True  # evolve synthetic tools with the LLM (section [tools.evolve])
    catalog: bool = False  # add the built-in catalog of ~300 synthetic tools with request templates (catalog.py)
    code_tool: bool = True  # add `run_python`, executed in the code sandbox
    evolve: EvolveConfig = field(default_factory=_tiny_evolve)

    def __post_init__(self) -> None:
        unknown = [s for s in self.mcp_servers if s not in MCP_SERVERS]
        if unknown:
            raise ValueError(f"tools.mcp_servers: unknown server {unknown[0]!r} (known: {', '.join(MCP_SERVERS)})")
        if self.path is not None and not Path(self.path).is_file():
            raise ValueError(f"tools.path: no file {self.path!r}")


@dataclass
class AgentsSection:
    """Agents = a system prompt (written by the LLM) + a tool subset (chosen programmatically, per domain)."""

    count: int = 4
    min_tools: int = 2
    max_tools: int = 8
    code_tool_fraction: float = 0.25  # share of agents that also get `run_python`
    max_tokens: int = 160  # for the system prompt

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.min_tools <= self.max_tools:
            raise ValueError(f"agents: need count >= 1 and 1 <= min_tools <= max_tools, got {self.count}, "
                             f"{self.min_tools}, {self.max_tools}")
        if not 0.0 <= self.code_tool_fraction <= 1.0:
            raise ValueError(f"agents.code_tool_fraction must be in [0, 1], got {self.code_tool_fraction}")


@dataclass
class TasksSection:
    """Tasks: a gold plan of tool calls run on the simulator first, then the LLM writes the request and rubric."""

    count: int = 8
    complexity: list[int] = field(default_factory=lambda: [1, 2, 3])  # distinct calls per plan; tasks cycle these
    plan_attempts: int = 4  # plans drawn per task before it is dropped (a plan must run cleanly)
    transient_retries: int = 1  # a call dealt a transient failure is retried this often inside the plan
    request_attempts: int = 2  # JSON attempts per ask; the ask is repeated once when values are missing
    max_tokens: int = 200
    # Argument values to draw from instead of the schema sampler, by "tool.param" or "param": real tools need
    # real values (a time zone, a SQL query); chained values from earlier calls still win.
    value_pools: dict[str, list[Any]] = field(default_factory=lambda: dict(DEFAULT_VALUE_POOLS))
    repeat_rate: float = 0.0  # chance that a later plan call repeats the tool before it, with other values
    out_of_scope_rate: float = 0.0  # share of tasks asking what only a catalog tool the agent lacks does
    # share of those whose request comes from another domain of the agent's own category (a geometry agent asked an
    # algebra question): near misses teach reading what the declared tools do; the rest ask another category's tool
    near_miss_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("repeat_rate", "out_of_scope_rate", "near_miss_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"tasks.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.count < 1 or not self.complexity or any(c < 1 for c in self.complexity):
            raise ValueError(f"tasks: need count >= 1 and complexity levels >= 1, got {self.count}, "
                             f"{self.complexity}")
        for name in ("plan_attempts", "request_attempts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"tasks.{name} must be >= 1, got {getattr(self, name)}")
        if self.transient_retries < 0:
            raise ValueError(f"tasks.transient_retries must be >= 0, got {self.transient_retries}")
        for key, pool in self.value_pools.items():
            if not isinstance(pool, list) or not pool:
                raise ValueError(f"tasks.value_pools.{key} must be a non-empty list, got {pool!r}")


@dataclass
class EpisodesSection:
    """Trajectory rollout: who acts as the assistant, the user simulator, bounds and concurrency."""

    # "gold": the assistant's tool calls are the gold plan's (teacher-forced, APIGen-MT style) and the LLM writes
    # its text; "model": the served model chooses the calls itself.
    assistant: Literal["model", "gold"] = "gold"
    per_task: int = 1
    max_user_turns: int = 2  # user turns in all, the task's request included
    max_assistant_steps: int = 6  # model mode: assistant messages per user turn
    max_tool_calls: int = 16
    concurrency: int = 64  # episodes in flight; the served model batches their requests
    retries: int = 1  # an episode whose infrastructure failed (MCP server lost, timeout) is rerun this often
    personas: list[str] = field(default_factory=lambda: list(DEFAULT_PERSONAS))
    stop_token: str = "###STOP###"
    user_max_tokens: int = 96
    assistant_max_tokens: int = 256
    system_prompt_rate: float = 1.0  # share of trajectories that start with the agent's system prompt

    def __post_init__(self) -> None:
        if not 0.0 <= self.system_prompt_rate <= 1.0:
            raise ValueError(f"episodes.system_prompt_rate must be in [0, 1], got {self.system_prompt_rate}")
        for name in ("per_task", "max_user_turns", "max_assistant_steps", "max_tool_calls", "concurrency",
                     "user_max_tokens", "assistant_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"episodes.{name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or not self.personas or not self.stop_token.strip():
            raise ValueError(f"episodes: need retries >= 0, personas and a stop_token, got {self.retries}, "
                             f"{self.personas!r}, {self.stop_token!r}")


@dataclass
class JudgeSection:
    """Programmatic checks, then one LLM verdict against the rubric (at most `attempts` <= 3 LLM calls)."""

    llm: bool = True
    attempts: int = 3  # the verdict is re-asked on invalid JSON; the issue caps a trajectory at 3 LLM calls
    must_pass: bool = True  # False: the LLM verdict is recorded but only the programmatic checks decide
    on_unusable: Literal["reject", "programmatic"] = "reject"  # no valid verdict after the attempts
    max_tokens: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 3:
            raise ValueError(f"judge.attempts must be 1..3 (at most 3 LLM calls per trajectory), got {self.attempts}")


@dataclass
class SynthConfig:
    """One synthesis run: `openk2 synth CONFIG`; the defaults are configs/synth_tiny.toml."""

    run_dir: str = "runs/synth-{time}"  # {time} becomes the start time, YYYYmmdd-HHMMSS
    seed: int = 0
    llm: LLMSection = field(default_factory=LLMSection)
    tools: ToolsSection = field(default_factory=ToolsSection)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    agents: AgentsSection = field(default_factory=AgentsSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    episodes: EpisodesSection = field(default_factory=EpisodesSection)
    judge: JudgeSection = field(default_factory=JudgeSection)

    def __post_init__(self) -> None:
        if not self.llm.enabled:
            needs = {"tools.synthetic = false": not self.tools.synthetic, "judge.llm = false": not self.judge.llm,
                     'episodes.assistant = "gold"': self.episodes.assistant == "gold",
                     "episodes.max_user_turns = 1": self.episodes.max_user_turns == 1}
            if missing := [k for k, ok in needs.items() if not ok]:
                raise ValueError(f"llm.enabled = false (no LLM) also needs {', '.join(missing)}")


def load_synth_config(path: str | Path | None = None, overrides: list[str] = ()) -> SynthConfig:
    """TOML file (optional) + dotted `--set` overrides -> a checked SynthConfig."""
    return load_config(SynthConfig, path, overrides)
