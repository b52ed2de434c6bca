"""One trajectory: a simulated user, the assistant, tools on the episode's world (paper §3.1.1, spec §4.3).

    user       an LLM playing one persona for the whole episode (picked by the episode's seed); its first message
               is the task's request, later ones are generated from the conversation with the roles flipped (it
               never sees tool traffic); it ends the episode with the stop token, or `max_user_turns` ends it
    assistant  "gold": the calls are the task's gold plan, turn by turn (independent calls in one turn), replayed
               on a fresh simulator with the plan's seed, so outcomes and the end state match the plan; the LLM
               writes the text (the final answer, replies to follow-ups), with a template summary when its answer
               is unusable (recorded in `notes`).
               "model": the served model chooses the calls (several per turn), up to `max_assistant_steps`
               messages per user turn and `max_tool_calls` in all
    tools      every call runs on the episode's simulator (state persists through the episode; real MCP tools are
               called for real, code in the sandbox) in a worker thread, so real calls do not block other episodes

Tool-call ids take K2's form `functions.NAME:IDX` (IDX counts the episode's calls from 0). An infrastructure
failure (a real server lost, a timeout) or an endpoint that never answers ends the episode as "failed" with the
reason; the pipeline retries or records it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from openk2.agentic.agents import Agent
from openk2.agentic.config import EpisodesSection
from openk2.agentic.llm import LLMOutputError, LLMRequestError
from openk2.agentic.simulate import Episode, ToolResult
from openk2.agentic.tasks import SimulatorFactory, Task
from openk2.agentic.tools import ToolSpec

_MARKUP = re.compile(r"<\|[^|>]*\|>|<\|[^>]*$")  # template tokens, and one cut off at the end of a reply


@dataclass
class Trajectory:
    """A rolled-out episode: the OpenAI-format messages, each call with its outcome, the world at the end."""

    episode_id: str
    task_id: str
    agent_id: str
    domain: str
    mode: str
    seed: int
    persona: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # id, tool, arguments (None: not JSON), outcome, ...
    final_state: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # "ok" or "failed"
    reason: str = ""  # why it failed
    stop: str = ""  # user_stop, user_silent, max_user_turns, assistant_silent, max_tool_calls, max_assistant_steps
    notes: list[str] = field(default_factory=list)  # fallbacks used, divergences from the plan
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        return cls(**data)


class InfrastructureFailure(RuntimeError):
    """A real tool's server was lost or timed out: the episode is not the model's fault and may be rerun."""


def clean_text(text: str | None) -> str:
    """Model text without chat-template markup and surrounding space; "" when it is degenerate (one phrase looped)."""
    text = _MARKUP.sub("", text or "").strip()
    # A small model stuck in a loop ("systemsystemsystem...") compresses to almost nothing; real prose does not.
    if len(text) >= 48 and len(zlib.compress(text.encode())) < 0.4 * len(text.encode()):
        return ""
    return text


def tool_call(name: str, arguments: Any, index: int) -> dict[str, Any]:
    """An OpenAI `tool_calls` entry with K2's id; `arguments` is a JSON string as OpenAI sends it."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"functions.{name}:{index}", "type": "function", "function": {"name": name, "arguments": text}}


def pick_persona(personas: list[str], seed: int) -> str:
    return random.Random(seed).choice(personas)


REFUSALS = (
    "Sorry, I can't help with that: none of the tools I have ({names}) can do it.",
    "I'm afraid that is outside what I can do here. My tools ({names}) don't cover this request.",
    "I can't do this one. The functions available to me ({names}) are meant for other tasks, and none of them fits.",
    "Unfortunately none of my tools fits this request (I have: {names}), so I can't do it for you.",
)


class _Rollout:
    """The mutable state of one episode while it runs."""

    def __init__(self, llm: Any, task: Task, agent: Agent, tools: dict[str, ToolSpec], world: Episode,
                 config: EpisodesSection, trajectory: Trajectory) -> None:
        self.llm, self.task, self.agent, self.config, self.world, self.t = llm, task, agent, config, world, trajectory
        self.openai_tools = [tools[name].to_openai() for name in agent.tools]
        self.messages = trajectory.messages

    async def execute(self, name: str, raw_arguments: Any) -> dict[str, Any]:
        """Run one call on the world; append its tool message; return its record."""
        call = tool_call(name, raw_arguments, len(self.t.calls))
        arguments = raw_arguments
        if isinstance(raw_arguments, str):
            try:
                arguments = json.loads(raw_arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            result = ToolResult("invalid_arguments", f"Error: arguments of {name} are not a JSON object: "
                                f"{str(raw_arguments)[:200]}", is_error=True)
            arguments = None
        else:
            result = await asyncio.to_thread(self.world.call, name, arguments)
        record = {"id": call["id"], "tool": name, "arguments": arguments, "outcome": result.outcome,
                  "is_error": result.is_error, "source": result.source}
        self.t.calls.append(record)
        self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result.to_content()})
        if result.outcome == "infrastructure_error":
            raise InfrastructureFailure(f"{name}: {result.to_content()[:300]}")
        return record

    async def assistant_text(self, stage_note: str) -> str | None:
        """The assistant's prose reply to the conversation so far (tool calls not allowed), or None if unusable."""
        if self.llm is None:
            return None
        reply = await self.llm.chat(self.messages, tools=self.openai_tools, tool_choice="none",
                                    max_tokens=self.config.assistant_max_tokens, seed=self.t.seed,
                                    stage="episodes/assistant")
        text = clean_text(reply.content)
        if not text:
            self.t.notes.append(f"{stage_note}: the assistant's reply was empty")
            return None
        return text

    async def gold_first_turn(self) -> bool:
        """Replay the plan's calls turn by turn, then the final answer. False when the assistant fell silent."""
        for turn in sorted({c.turn for c in self.task.calls}):
            planned = [c for c in self.task.calls if c.turn == turn]
            first = len(self.t.calls)
            self.messages.append({"role": "assistant", "content": None,
                                  "tool_calls": [tool_call(c.tool, c.arguments, first + i)
                                                 for i, c in enumerate(planned)]})
            for c in planned:
                got = await self.execute(c.tool, c.arguments)
                if got["outcome"] != c.outcome:
                    self.t.notes.append(f"{got['id']}: outcome {got['outcome']}, the plan had {c.outcome}")
        text = await self.assistant_text("final answer")
        if text is None and not self.task.calls:
            text = self.refusal()
            self.t.notes.append("final answer from the out-of-scope template")
        elif text is None:
            text = self.summary()
            self.t.notes.append("final answer from the template summary")
        self.messages.append({"role": "assistant", "content": text})
        return True

    def summary(self) -> str:
        """A plain report of the tool results (the gold answer when the LLM wrote none)."""
        lines = []
        for message in self.messages:
            if message["role"] == "tool":
                lines.append(f"- {message['tool_call_id'].split(':')[0].removeprefix('functions.')}: "
                             f"{message['content'][:300]}")
        return "Here is what I found:\n" + "\n".join(lines)

    def refusal(self) -> str:
        """The gold answer to a request no tool of the agent serves (an out-of-scope task)."""
        names = ", ".join(self.agent.tools)
        return random.Random(self.t.seed).choice(REFUSALS).format(names=names)

    async def model_turn(self) -> bool:
        """The served model answers the last user message, calling tools as it likes. False when it stopped short."""
        for _ in range(self.config.max_assistant_steps):
            reply = await self.llm.chat(self.messages, tools=self.openai_tools,
                                        max_tokens=self.config.assistant_max_tokens, seed=self.t.seed,
                                        stage="episodes/assistant")
            calls = reply.message.get("tool_calls") or []
            text = clean_text(reply.message.get("content"))
            if not calls:
                if not text:
                    self.t.stop = "assistant_silent"
                    return False
                self.messages.append({"role": "assistant", "content": text})
                return True
            if len(self.t.calls) + len(calls) > self.config.max_tool_calls:
                self.t.stop = "max_tool_calls"
                return False
            first = len(self.t.calls)
            named = [(c.get("function", {}).get("name", ""), c.get("function", {}).get("arguments", "")) for c in calls]
            self.messages.append({"role": "assistant", "content": text or None,
                                  "tool_calls": [tool_call(n, a, first + i) for i, (n, a) in enumerate(named)]})
            for name, arguments in named:
                await self.execute(name, arguments)
        self.t.stop = "max_assistant_steps"
        return False

    async def user_reply(self) -> str | None:
        """The simulated user's next message, or None when it stops (the stop token, or nothing to say)."""
        if self.llm is None:
            self.t.stop = "no_user_simulator"
            return None
        stop = self.config.stop_token
        system = (f"You are role-playing a user who talks to an AI assistant. You are {self.t.persona}. Your goal: "
                  f"{self.task.user_request}\nWrite only the user's next message, briefly. If your goal has been met "
                  f"or you have nothing more to ask, reply with exactly {stop}")
        flipped = [{"role": "user", "content": "(You start the conversation.)"}]
        for message in self.messages:
            text = message.get("content")
            if message["role"] == "user":
                flipped.append({"role": "assistant", "content": text})
            elif message["role"] == "assistant" and text:
                flipped.append({"role": "user", "content": text})
        reply = await self.llm.chat([{"role": "system", "content": system}, *flipped],
                                    max_tokens=self.config.user_max_tokens, seed=self.t.seed + len(self.messages),
                                    stage="episodes/user")
        text = clean_text(reply.content)
        if text and text[:40] in system:  # the model echoed its instructions instead of playing the user
            self.t.notes.append("the user simulator echoed its prompt")
            text = ""
        if stop in text or stop.strip("#") in text:
            self.t.stop = "user_stop"
            return None
        if not text:
            self.t.stop = "user_silent"
            return None
        return text


async def run_episode(llm: Any, task: Task, agent: Agent, tools: dict[str, ToolSpec], simulators: SimulatorFactory,
                      config: EpisodesSection, episode_id: str, seed: int) -> Trajectory:
    """Roll out one episode of `task` with `agent`; failures come back as a Trajectory with status "failed"."""
    if not task.kept or task.rubric is None:
        raise ValueError(f"task {task.task_id!r} was dropped ({task.reason}); it has no episode")
    mode = config.assistant
    trajectory = Trajectory(episode_id, task.task_id, agent.agent_id, agent.domain, mode, seed,
                            pick_persona(config.personas, seed))
    if random.Random(seed).random() < config.system_prompt_rate:
        trajectory.messages.append({"role": "system", "content": agent.system_prompt})
    trajectory.messages.append({"role": "user", "content": task.user_request})
    # Gold replays the plan on the plan's own seed (same outcomes, same state); model mode too, so that a model
    # making the plan's calls meets the plan's world and the end states compare.
    world = simulators([tools[name] for name in agent.tools], task.seed).new_episode(task.seed)
    rollout = _Rollout(llm, task, agent, tools, world, config, trajectory)
    try:
        for user_turn in range(config.max_user_turns):
            if mode == "model":
                answered = await rollout.model_turn()
            elif user_turn == 0:
                answered = await rollout.gold_first_turn()
            else:
                text = await rollout.assistant_text("follow-up")
                answered = text is not None
                if answered:
                    trajectory.messages.append({"role": "assistant", "content": text})
                else:
                    trajectory.stop = "assistant_silent"
            if not answered:
                break
            if user_turn + 1 == config.max_user_turns:
                trajectory.stop = "max_user_turns"
                break
            text = await rollout.user_reply()
            if text is None:
                break
            trajectory.messages.append({"role": "user", "content": text})
    except InfrastructureFailure as e:
        trajectory.status, trajectory.reason = "failed", f"infrastructure: {e}"
    except (LLMRequestError, LLMOutputError) as e:
        trajectory.status, trajectory.reason = "failed", f"LLM: {str(e)[:300]}"
    if trajectory.messages[-1]["role"] == "user" and len(trajectory.messages) > 2:
        trajectory.messages.pop()  # a follow-up nobody answered teaches nothing
        trajectory.notes.append("dropped the last user message: no assistant reply")
    trajectory.final_state = json.loads(json.dumps(world.state()))
    return trajectory
