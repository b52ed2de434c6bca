"""SFT data (issue 7): the assistant-only loss mask token by token, bad-line reports, and leak-free packing."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from openk2 import K2ForCausalLM, preset
from openk2.data.chat import ChatTemplate
from openk2.data.sft import (
    IGNORE,
    BadExampleError,
    PackedBatches,
    pack_examples,
    read_chat_jsonl,
    tokenize_conversation,
)
from openk2.data.sft_sample import TOOLS, sample_conversations
from openk2.data.tokenizer import BOS_TOKEN, EOS_TOKEN, train_tokenizer
from openk2.train.sft import packed_loss

CONVERSATION = {"tools": TOOLS[:2], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "snowy"}'},
    {"role": "assistant", "content": "Snowy in Oslo."},
]}


@pytest.fixture(scope="module")
def k2_tokenizer():
    k2 = ChatTemplate.k2()
    texts = [k2.render(c["messages"], c.get("tools")) for c in sample_conversations(64)]
    return train_tokenizer(texts, vocab_size=600, progress=False)


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_loss_mask_token_by_token(k2_tokenizer):
    """Loss on the assistant's text, calls and turn ends; none on system, user, tool results, headers, declarations."""
    example = tokenize_conversation(CONVERSATION["messages"], CONVERSATION["tools"], ChatTemplate.k2(), k2_tokenizer)
    pieces = [(k2_tokenizer.decode([i]), m) for i, m in zip(example.ids, example.loss_mask, strict=True)]
    print("\n".join(f"{'LOSS' if m else '    '} {t!r}" for t, m in pieces))
    assert k2_tokenizer.decode(example.ids) == ChatTemplate.k2().render(CONVERSATION["messages"], TOOLS[:2])
    # the loss-carrying tokens, in order, spell exactly the two assistant turns
    spans, current = [], ""
    for text, m in pieces:
        if m:
            current += text
        elif current:
            spans.append(current)
            current = ""
    spans += [current] if current else []
    assert spans == [
        "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
        "Snowy in Oslo.<|im_end|>",
    ]
    # and token by token around the first answer: the header does not carry loss, the answer's first token does
    at = next(i for i, (t, _) in enumerate(pieces) if t == "<|im_assistant|>")
    assert pieces[at:at + 4] == [("<|im_assistant|>", False), ("assistant", False), ("<|im_middle|>", False),
                                 (pieces[at + 3][0], True)]
    tool_turn = next(i for i, (t, _) in enumerate(pieces) if t == "##")
    assert not any(m for _, m in pieces[tool_turn - 3:tool_turn + 12])  # "## Return of functions.get_weather:0 ..."


def test_the_prompt_is_tokenised_as_a_server_tokenises_it():
    """With K2's markers as plain text, a BPE merges `<|im_middle|>` into the reply's `<|tool...` (a `|><` token) when
    the whole text is tokenised at once. Each assistant turn must instead start where generation starts: the ids
    before it are exactly the ids of its prompt (generation prompt included) tokenised alone."""
    k2 = ChatTemplate.k2()
    texts = [k2.render(c["messages"], c.get("tools")) for c in sample_conversations(64)]
    plain = train_tokenizer(texts, vocab_size=700, special_tokens=[BOS_TOKEN, EOS_TOKEN], progress=False)
    messages, tools = json.loads(json.dumps(CONVERSATION["messages"])), CONVERSATION["tools"]
    messages[2]["content"] = None  # the reply opens with `<|tool_calls_section_begin|>`
    whole = plain.encode(k2.render(messages, tools))
    assert any(plain.decode([i]).startswith("|><") for i in whole)  # the trap is real for this tokenizer

    example = tokenize_conversation(messages, tools, k2, plain)
    assert plain.decode(example.ids) == k2.render(messages, tools)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    starts = [t for t in range(1, len(example.ids)) if example.loss_mask[t] and not example.loss_mask[t - 1]]
    assert len(starts) == len(turns) == 2
    first_prompt = plain.encode(k2.render(messages[:turns[0]], tools, add_generation_prompt=True))
    assert example.ids[:starts[0]] == first_prompt
    assert plain.decode(example.ids[starts[0]:starts[0] + 2]).startswith("<|tool")
    # the later turn's prompt ends with the same header tokens as its own tokenisation
    second_prompt = plain.encode(k2.render(messages[:turns[1]], tools, add_generation_prompt=True))
    assert example.ids[starts[1] - 3:starts[1]] == second_prompt[-3:]


def test_jinja_template_masks_only_the_assistant_turns():
    chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    k2_tokenizer = train_tokenizer(["Hi there, hello you."] * 4, vocab_size=300, progress=False)
    k2_tokenizer.backend.add_special_tokens(["<|im_start|>"])
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello you"}]
    example = tokenize_conversation(messages, None, ChatTemplate.from_jinja(chatml), k2_tokenizer)
    trained = k2_tokenizer.decode([i for i, m in zip(example.ids, example.loss_mask, strict=True) if m])
    assert trained == "Hello you<|im_end|>\n"


def test_bad_lines_are_reported_with_line_and_reason_and_skipped(tmp_path, k2_tokenizer):
    good = CONVERSATION
    undeclared = json.loads(json.dumps(good))
    undeclared["messages"][2]["tool_calls"][0]["function"]["name"] = "launch_rocket"
    orphan = json.loads(json.dumps(good))
    orphan["messages"][3]["tool_call_id"] = "call_9"
    long = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "word " * 400}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        good, '{"messages": [', undeclared, "", long, orphan,
        {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": [{"role": "user", "content": "hi"}]},
        good])
    reported = []
    examples, bad = read_chat_jsonl([path], k2_tokenizer, ChatTemplate.k2(), seq_len=256, report=reported.append)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:9"]
    assert reported == bad
    reasons = {b.line: b.reason for b in bad}
    assert sorted(reasons) == [2, 3, 5, 6, 7, 8]  # line 4 is blank: no example there
    assert reasons[2].startswith("malformed JSON")
    assert "undeclared tool 'launch_rocket'" in reasons[3]
    assert "longer than the context data.seq_len = 256" in reasons[5]
    assert "tool_call_id 'call_9' matches no earlier tool call" in reasons[6]
    assert "unknown role 'wizard'" in reasons[7]
    assert "no assistant message" in reasons[8]
    assert str(bad[0]) == f"{path}:2: {reasons[2]}"

    with pytest.raises(BadExampleError, match=f"{path}:2: malformed JSON"):
        read_chat_jsonl([path], k2_tokenizer, ChatTemplate.k2(), seq_len=256, on_bad_example="fail")


def test_packing_keeps_examples_whole_with_restarting_positions(k2_tokenizer):
    convs = sample_conversations(12, seed=3)
    examples = [tokenize_conversation(c["messages"], c.get("tools"), ChatTemplate.k2(), k2_tokenizer) for c in convs]
    rows = pack_examples(examples, seq_len=600, pad_id=0)
    assert rows.trained_tokens == sum(e.trained_tokens - e.loss_mask[0] for e in examples)
    found = []
    for r in range(len(rows)):
        docs = rows.document_ids[r]
        for d in docs.unique().tolist():
            where = (docs == d).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous
            assert torch.equal(rows.position_ids[r, where], torch.arange(len(where)))  # restart at 0
            assert rows.labels[r, where[0]] == IGNORE  # never predicted across the boundary
            found.append(rows.input_ids[r, where].tolist())
    for e in examples:
        assert e.ids in found


def test_batches_resume_from_state_dict(k2_tokenizer):
    examples = [tokenize_conversation(c["messages"], c.get("tools"), ChatTemplate.k2(), k2_tokenizer)
                for c in sample_conversations(10)]
    rows = pack_examples(examples, 300, 0)
    a = PackedBatches(rows, batch_size=3, seed=1)
    for _ in range(5):  # crosses epoch boundaries
        next(a)
    b = PackedBatches(rows, batch_size=3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(next(a).input_ids, next(b).input_ids)


def tiny_k2(vocab: int) -> K2ForCausalLM:
    torch.manual_seed(0)
    config = preset("tiny").replace(vocab_size=vocab, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                    moe_intermediate_size=32, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
                                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                    num_experts_per_tok=2)
    return K2ForCausalLM(config).eval()


def tiny_llama(vocab: int, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        attn_implementation=attn)).eval()


@pytest.mark.parametrize("make", [tiny_k2, lambda v: tiny_llama(v, "sdpa"), lambda v: tiny_llama(v, "eager")],
                         ids=["k2", "llama-sdpa", "llama-eager"])
def test_packed_row_equals_each_example_alone(k2_tokenizer, make):
    """No attention across examples: packed logits equal solo logits; packed loss = token-weighted mean of losses."""
    model = make(k2_tokenizer.vocab_size)
    examples = [tokenize_conversation(c["messages"], c.get("tools"), ChatTemplate.k2(), k2_tokenizer)
                for c in sample_conversations(40, seed=5) if not c.get("tools")][:3]
    assert len(examples) == 3
    rows = pack_examples(examples, seq_len=sum(len(e.ids) for e in examples) + 5, pad_id=0)
    assert len(rows) == 1 and rows.document_ids[0].unique().numel() == 4  # three examples and the padding
    with torch.no_grad():
        if isinstance(model, K2ForCausalLM):
            packed = model(rows.input_ids, position_ids=rows.position_ids, document_ids=rows.document_ids).logits
        else:
            packed = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits
        losses, weights = [], []
        for d in range(3):
            where = (rows.document_ids[0] == d).nonzero().flatten()
            alone = rows.rows(0, 1)
            ids, labels = alone.input_ids[:, where], alone.labels[:, where]
            solo = model(ids).logits
            torch.testing.assert_close(packed[:, where], solo, atol=1e-5, rtol=1e-5)
            losses.append(float(packed_loss(model, type(rows)(ids, labels, torch.arange(len(where))[None],
                                                               torch.zeros_like(ids)))))
            weights.append(int((labels != IGNORE).sum()))
        expected = sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)
        assert float(packed_loss(model, rows)) == pytest.approx(expected, rel=1e-5)
