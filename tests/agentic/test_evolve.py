"""Synthetic tool evolution: schemas built from the flat format, rejections with reasons, dedup, the hierarchy."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import jsonschema
import pytest

from openk2.agentic.evolve import (
    DEFAULT_CATEGORIES,
    Candidate,
    EvolveConfig,
    build_tool,
    evolve_tools,
    load_tools,
    near_duplicates,
    save_tools,
    similarity,
    snake_case,
)
from openk2.agentic.llm import ChatResult, LLMClient, LLMConfig, LLMOutputError
from openk2.agentic.tools import ToolSpec
from tests.agentic.test_llm import FakeOpenAIServer, FakeReply


class Rounds(list):
    """Successive answers to the same question (round 0, round 1, ...)."""


class FakeLLM:
    """Answers evolve's prompts from tables: category -> domain names, domain -> tool entries (or an exception)."""

    def __init__(self, domains: dict[str, Any], tools: dict[str, Any]):
        self.domains, self.tools = domains, tools
        self.prompts: list[tuple[str, str]] = []  # (stage, last user turn)
        self.messages: list[list[dict[str, str]]] = []
        self.usage: dict[str, dict[str, int]] = {}
        self._asked: dict[str, int] = {}

    def _answer(self, messages: list[dict[str, str]], stage: str) -> dict[str, Any]:
        text = messages[-1]["content"]
        self.prompts.append((stage, text))
        self.messages.append(messages)
        self.usage.setdefault(stage, {"calls": 0})["calls"] += 1
        category = re.search(r"^Category: (.+)$", text, re.M).group(1)
        domain = re.search(r"^Domain: (.+)$", text, re.M)
        key = domain.group(1) if domain else category
        answer = (self.tools if domain else self.domains)[key]
        if isinstance(answer, Rounds):
            answer = answer[self._asked.setdefault(key, 0)]
            self._asked[key] += 1
        if isinstance(answer, Exception):
            raise answer
        return {"tools": answer} if domain else {"domains": answer}

    async def json(self, messages: list[dict[str, str]], schema: dict[str, Any], *, stage: str,
                   **kwargs: Any) -> dict[str, Any]:
        value = self._answer(messages, stage)
        jsonschema.validate(value, schema)
        return value

    async def chat(self, messages: list[dict[str, str]], *, stage: str, **kwargs: Any) -> ChatResult:
        return ChatResult({"role": "assistant", "content": json.dumps(self._answer(messages, stage))}, "stop",
                          {"prompt_tokens": 0, "completion_tokens": 0}, cached=False)


def tool(name: str, description: str, *params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "description": description, "parameters": list(params), **extra}


def param(name: str, kind: str = "string", required: bool = True, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "description": f"the {name}", "required": required, **extra}


QUOTE = tool("get_stock_quote", "Get the latest price of a stock.", param("symbol"),
             param("currency", required=False, enum=["USD", "EUR"]))
ORDER = tool("place_order", "Place a buy or sell order for shares.", param("symbol"), param("quantity", "int"),
             param("side", enum=["buy", "sell"]), outputs=[param("order_id")])
BUDGET = tool("create_budget", "Create a monthly budget with a spending limit.", param("month", "date"),
              param("limit", "float"), param("tags", "list", required=False, items="string"))
EXPENSE = tool("log_expense", "Record one expense against a budget.", param("amount", "number"),
               param("paid", "bool", required=False))
FLIGHTS = tool("search_flights", "Search one-way flights between two airports on a date.", param("origin"),
               param("destination"), param("date", "date"))
HOTEL = tool("book_hotel", "Book a hotel room for some nights.", param("hotel_id"), param("nights", "integer"))


def evolve(llm: Any, **config: Any):
    return asyncio.run(evolve_tools(llm, EvolveConfig(**config)))


def small_world() -> FakeLLM:
    return FakeLLM(domains={"finance": ["Stock Trading", "personal budgeting"], "travel": ["flight booking"]},
                   tools={"stock trading": [QUOTE, ORDER], "personal budgeting": [BUDGET, EXPENSE],
                          "flight booking": [FLIGHTS, HOTEL]})


def test_a_valid_evolution_builds_the_schemas_and_records_the_hierarchy():
    result = evolve(small_world(), categories=["finance", "travel"], domains_per_category=2, tools_per_domain=2)
    assert result.rejected == [] and result.stats.failed_calls == []
    assert result.hierarchy == {"finance": ["stock trading", "personal budgeting"], "travel": ["flight booking"]}
    by_name = {t.name: t for t in result.tools}
    assert list(by_name) == ["get_stock_quote", "place_order", "create_budget", "log_expense", "search_flights",
                             "book_hotel"]
    assert by_name["place_order"].source == "synthetic:finance/stock trading"
    assert by_name["search_flights"].source == "synthetic:travel/flight booking"
    assert by_name["get_stock_quote"].input_schema == {
        "type": "object", "additionalProperties": False, "required": ["symbol"],
        "properties": {"symbol": {"type": "string", "description": "the symbol"},
                       "currency": {"type": "string", "description": "the currency", "enum": ["USD", "EUR"]}}}
    budget = by_name["create_budget"].input_schema["properties"]
    assert budget == {"month": {"type": "string", "format": "date", "description": "the month"},
                      "limit": {"type": "number", "description": "the limit"},
                      "tags": {"type": "array", "items": {"type": "string"}, "description": "the tags"}}
    assert by_name["place_order"].input_schema["properties"]["quantity"]["type"] == "integer"
    assert by_name["place_order"].output_schema == {"type": "object", "properties": {
        "order_id": {"type": "string", "description": "the order_id"}}}
    assert by_name["place_order"].raw == ORDER  # the LLM's entry, as it gave it
    schema = by_name["place_order"].input_schema
    jsonschema.validate({"symbol": "ACME", "quantity": 3, "side": "buy"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"symbol": "ACME", "quantity": 3, "side": "hold"}, schema)
    stats = result.stats
    assert (stats.categories, stats.domains, stats.candidates, stats.accepted) == (2, 3, 6, 6)
    # travel gave 1 of 2 domains, so it was asked a second time (and answered nothing new)
    assert stats.usage["evolve/domains"]["calls"] == 3 and stats.usage["evolve/tools"]["calls"] == 3


def test_the_llm_writes_language_and_is_asked_in_the_flat_format():
    llm = small_world()
    evolve(llm, categories=["finance"], domains_per_category=2, tools_per_domain=2)
    stage, prompt = llm.prompts[-1]
    assert stage == "evolve/tools" and "Domain: personal budgeting" in prompt and "Invent 2 different tools" in prompt
    example_ask, example_answer = llm.messages[-1][:2]  # shown once worked through, as an earlier exchange
    assert example_ask["role"] == "user" and "Domain: flight booking" in example_ask["content"]
    assert example_answer["role"] == "assistant"
    assert json.loads(example_answer["content"])["tools"][0]["parameters"][0] == {
        "name": "origin", "type": "string", "description": "departure airport code", "required": True}
    example = build_tool(Candidate("travel", "flight booking", json.loads(example_answer["content"])["tools"][0]))
    assert example.input_schema["required"] == ["origin", "date"]  # the example itself is a valid tool


@pytest.mark.parametrize("entry, reason", [
    (tool("123", "Numbers only."), "invalid name: '123' is not a snake_case identifier"),
    (tool("fine_name", "  "), "invalid description: '  '"),
    (tool("fine_name", "Has a bad type.", param("x", "wibble")), "invalid schema: parameter 'x' has unknown type"),
    (tool("fine_name", "Requires a ghost.", param("x"), required=["ghost"]),
     "invalid schema: required key 'ghost' is not a parameter"),
    (tool("fine_name", "Enum of the wrong type.", param("n", "integer", enum=["one", "two"])),
     "invalid schema: enum ['one', 'two'] of parameter 'n' does not match its type"),
    (tool("fine_name", "Same parameter twice.", param("x"), param("X")), "invalid schema: parameter 'x' given twice"),
    ({"name": "fine_name", "description": "Parameters as prose.", "parameters": "a city"},
     "invalid schema: parameters must be a list"),
    ("just a string", "not an object"),
])
def test_invalid_candidates_are_rejected_with_their_reason(entry, reason):
    llm = FakeLLM(domains={"finance": ["banking"]}, tools={"banking": [QUOTE, entry]})
    result = evolve(llm, categories=["finance"], domains_per_category=1, tools_per_domain=2)
    assert [t.name for t in result.tools] == ["get_stock_quote"]
    [(candidate, why)] = result.rejected
    assert candidate == Candidate("finance", "banking", entry)
    assert why.startswith(reason)
    assert sum(result.stats.rejected.values()) == 1


def test_names_and_schema_forms_that_small_models_write_are_normalised():
    assert snake_case("getStockQuote") == "get_stock_quote" and snake_case("Get stock-quote ") == "get_stock_quote"
    schema_form = {"name": "GetWeather", "description": "Weather now.",
                   "parameters": {"type": "object", "properties": {"cityName": {"type": "str"}, "days": "int"},
                                  "required": ["cityName"]}}
    spec = build_tool(Candidate("weather and environment", "forecasts", schema_form))
    assert spec.name == "get_weather"
    assert spec.input_schema["properties"] == {"city_name": {"type": "string"}, "days": {"type": "integer"}}
    assert spec.input_schema["required"] == ["city_name"]


def test_a_duplicate_name_gets_the_domain_prefix_or_is_rejected():
    search_a = tool("search_items", "Find products in the catalogue by keyword.", param("query"))
    search_b = tool("search_items", "List open support tickets of a customer.", param("customer_id"))
    search_c = tool("search_items", "Look up shipments by tracking number and carrier.", param("tracking_number"))
    search_d = tool("search_items", "Browse archived invoices by year and vendor name.", param("year", "int"))
    llm = FakeLLM(domains={"e-commerce": ["catalogue", "support"]},
                  tools={"catalogue": [search_a], "support": [search_b, search_c, search_d]})
    result = evolve(llm, categories=["e-commerce"], domains_per_category=2, tools_per_domain=3, max_rounds=1)
    assert [t.name for t in result.tools] == ["search_items", "support_search_items"]
    assert result.tools[1].raw["name"] == "search_items"  # raw keeps what the LLM wrote
    assert [why for _, why in result.rejected] == [
        "duplicate name: 'search_items' and 'support_search_items' are taken"] * 2
    assert result.stats.renamed == 1 and result.stats.rejected == {"duplicate name": 2}


def test_near_duplicates_are_removed_and_name_what_they_repeat():
    weather = tool("get_weather", "Get the current weather for a city.", param("city"))
    again = tool("get_current_weather", "Get current weather for a city.", param("city"))
    forecast = tool("get_forecast", "Get the weather forecast for the next days in a city.", param("city"),
                    param("days", "int"))
    llm = FakeLLM(domains={"weather and environment": ["weather", "climate"]},
                  tools={"weather": [weather, forecast], "climate": [again]})
    result = evolve(llm, categories=["weather and environment"], domains_per_category=2, tools_per_domain=2,
                    max_rounds=1)
    assert [t.name for t in result.tools] == ["get_weather", "get_forecast"]
    [(candidate, why)] = result.rejected
    assert candidate.raw is again and re.fullmatch(r"near duplicate: of 'get_weather' \(similarity 0\.9\d\)", why)
    strict = evolve(FakeLLM(llm.domains, llm.tools), categories=["weather and environment"],
                    domains_per_category=2, tools_per_domain=2, near_duplicate_threshold=0.99, max_rounds=1)
    assert len(strict.tools) == 3  # the threshold is the config's


def test_near_duplicates_are_greedy_in_order_and_spare_existing_tools():
    texts = ["send an email to a person", "send an email to a person now", "book a table at a restaurant",
             "send an e-mail to a person"]
    assert similarity(texts[0], texts[0]) == pytest.approx(1.0)
    removed = near_duplicates(texts, 0.85)
    assert set(removed) == {1, 3} and removed[1][0] == 0 and removed[3][0] == 0
    assert set(near_duplicates(texts, 0.85, protected=2)) == {3}  # 1 is "existing": kept though it repeats 0
    assert near_duplicates(texts * 300, 0.999, block=64).keys() == set(range(4, 1200)) - {2}


def test_existing_tools_keep_their_names_and_win():
    existing = [ToolSpec(name="get_stock_quote", description="Get the latest price of a stock.",
                         input_schema={"type": "object", "properties": {"symbol": {"type": "string"}}},
                         source="mcp:finance")]
    result = asyncio.run(evolve_tools(small_world(), EvolveConfig(categories=["finance"], domains_per_category=1,
                                                                  tools_per_domain=2), existing=existing))
    assert [t.name for t in result.tools] == ["place_order"]
    assert result.rejected[0][1].startswith("near duplicate: of 'get_stock_quote'")


def test_domains_written_as_objects_are_read():
    llm = FakeLLM(domains={"travel": [{"name": "Cruises", "description": "sea trips"}, 7, "x" * 61]},
                  tools={"cruises": [HOTEL]})
    result = evolve(llm, categories=["travel"], domains_per_category=3, tools_per_domain=1, max_rounds=1)
    assert result.hierarchy == {"travel": ["cruises"]}  # a number and a sentence-long name are not domains


def test_fewer_than_asked_means_another_round_naming_what_was_given():
    llm = FakeLLM(domains={"travel": Rounds([["flight booking"], ["Flight Booking", "car rental", "cruises"]])},
                  tools={"flight booking": Rounds([[FLIGHTS], [HOTEL]]), "car rental": [FLIGHTS, HOTEL]})
    result = evolve(llm, categories=["travel"], domains_per_category=2, tools_per_domain=2)
    assert result.hierarchy == {"travel": ["flight booking", "car rental"]}  # the repeat is not counted
    domain_prompts = [p for s, p in llm.prompts if s == "evolve/domains"]
    assert "List 1 specific" in domain_prompts[1] and "do not repeat: flight booking" in domain_prompts[1]
    tool_prompts = [p for s, p in llm.prompts if "Domain: flight booking" in p]
    assert len(tool_prompts) == 2 and "do not repeat: search_flights" in tool_prompts[1]
    assert [t.name for t in result.tools][:2] == ["search_flights", "book_hotel"]


def test_a_failed_llm_call_is_recorded_and_the_run_goes_on():
    llm = FakeLLM(domains={"finance": ["stock trading", "banking"], "travel": LLMOutputError("evolve/domains",
                                                                                              "garbage", ["no"])},
                  tools={"stock trading": [QUOTE], "banking": LLMOutputError("evolve/tools", "garbage", ["no"])})
    result = evolve(llm, categories=["finance", "travel"], domains_per_category=2, tools_per_domain=1)
    assert [t.name for t in result.tools] == ["get_stock_quote"]
    assert result.hierarchy == {"finance": ["stock trading", "banking"], "travel": []}
    assert len(result.stats.failed_calls) == 2
    assert result.stats.failed_calls[0].startswith("domains of 'travel'")
    assert result.stats.failed_calls[1].startswith("tools of 'finance'/'banking'")


def test_the_repository_round_trips_through_jsonl(tmp_path):
    tools = evolve(small_world(), categories=["finance", "travel"], domains_per_category=2, tools_per_domain=2).tools
    path = tmp_path / "tools" / "synthetic.jsonl"
    save_tools(tools, path)
    assert load_tools(path) == tools and len(path.read_text().splitlines()) == 6
    path.write_text(path.read_text() + '{"name": ""}\n')
    with pytest.raises(ValueError, match=r"synthetic.jsonl:7"):
        load_tools(path)


def test_config_defaults_and_checks():
    assert EvolveConfig().categories == list(DEFAULT_CATEGORIES) and len(DEFAULT_CATEGORIES) >= 20
    with pytest.raises(ValueError, match="near_duplicate_threshold"):
        EvolveConfig(near_duplicate_threshold=0.0)
    with pytest.raises(ValueError, match="categories repeat"):
        EvolveConfig(categories=["finance", "Finance"])
    with pytest.raises(ValueError, match="tools_per_domain"):
        EvolveConfig(tools_per_domain=0)


# ----------------------------------------------------------------------------------------------------------------
# end to end through the real client and a real HTTP server


def scripted_model(body: dict[str, Any]) -> FakeReply:
    """A model that answers evolve's prompts the way small models do: prose, fences, a trailing comma."""
    text = body["messages"][-1]["content"]
    category = re.search(r"^Category: (.+)$", text, re.M).group(1)
    domain = re.search(r"^Domain: (.+)$", text, re.M)
    if domain is None:
        return FakeReply(f"Sure! Here are domains for {category}:\n```json\n"
                         f'{{"domains": ["{category} basics", "{category} advanced",]}}\n```')
    stem = snake_case(domain.group(1))
    tools = [tool(f"{stem}_lookup", f"Look up a record in {domain.group(1)} by id.", param("record_id")),
             tool(f"{stem}_report", f"Summarise {domain.group(1)} activity for a month.", param("month", "date"))]
    return FakeReply(json.dumps({"tools": tools}))


def test_evolve_through_the_openai_client_end_to_end(tmp_path):
    with FakeOpenAIServer(responder=scripted_model) as server:
        config = EvolveConfig(categories=["finance", "travel"], domains_per_category=2, tools_per_domain=2)

        async def run() -> Any:
            async with LLMClient(LLMConfig(base_url=server.url, model="fake", cache_dir=str(tmp_path))) as llm:
                return await evolve_tools(llm, config)

        result = asyncio.run(run())
        assert len(server.requests) == 6 and result.rejected == []
        assert [t.name for t in result.tools][:2] == ["finance_basics_lookup", "finance_basics_report"]
        assert {t.source for t in result.tools} == {"synthetic:finance/finance basics",
                                                    "synthetic:finance/finance advanced",
                                                    "synthetic:travel/travel basics",
                                                    "synthetic:travel/travel advanced"}
        assert result.stats.usage["evolve/domains"]["calls"] == 2 and result.stats.usage["evolve/tools"]["calls"] == 4
        assert result.stats.usage["evolve/tools"]["completion_tokens"] == 20
        again = asyncio.run(run())  # a rerun is answered from the cache
        assert len(server.requests) == 6 and again.tools == result.tools
        assert again.stats.usage["evolve/tools"]["cached_calls"] == 4
        assert again.stats.usage["evolve/tools"]["completion_tokens"] == 0
