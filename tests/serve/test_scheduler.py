import queue
import threading
import time

import pytest

from openk2 import K2ForCausalLM
from openk2.data.tokenizer import load_tokenizer
from openk2.serve import Engine, SamplingParams
from openk2.serve.scheduler import IncrementalDetokenizer, Scheduler, StepOutput

GREEDY = dict(temperature=0.0, stop_token_ids=())


@pytest.fixture(scope="module")
def tokenizer(k2_dir):
    return load_tokenizer(k2_dir)


def make_scheduler(k2_dir, tokenizer, max_batch=4, max_seq_len=128) -> Scheduler:
    engine = Engine(K2ForCausalLM.from_pretrained(k2_dir), max_batch=max_batch, max_seq_len=max_seq_len)
    return Scheduler(engine, tokenizer.decode, default_stop_ids=[tokenizer.eos_id]).start()


@pytest.fixture
def scheduler(k2_dir, tokenizer):
    s = make_scheduler(k2_dir, tokenizer)
    yield s
    s.shutdown()


def prompts(tokenizer, n):
    texts = ["the weather in paris", "a tool", "experts route each token to a few of many matrices and",
             "café", "the model reads tokens", "tokyo", "sunny and warm while", "calls"]
    return [tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


def run_all(scheduler, requests) -> list[list[StepOutput]]:
    """Submit every (prompt, params) at once; collect each request's events."""
    sinks = [queue.SimpleQueue() for _ in requests]
    for (prompt, params), sink in zip(requests, sinks):
        scheduler.submit(prompt, params, sink.put)
    results = []
    for sink in sinks:
        events = [sink.get(timeout=60)]
        while events[-1].finish_reason is None:
            events.append(sink.get(timeout=60))
        results.append(events)
    return results


def joined(events):
    return ([t for e in events for t in e.token_ids], "".join(e.text for e in events), events[-1].finish_reason)


def test_concurrent_requests_share_steps_and_equal_one_at_a_time(scheduler, tokenizer):
    """Continuous batching at temperature 0: same tokens as serving each request alone, in fewer steps."""
    requests = [(p, SamplingParams(max_new_tokens=5 + 3 * i, **GREEDY)) for i, p in enumerate(prompts(tokenizer, 7))]
    alone = [scheduler.generate(p, params) for p, params in requests]
    steps_alone = scheduler.steps
    together = run_all(scheduler, requests)
    steps_together = scheduler.steps - steps_alone
    assert scheduler.max_running_seen == 4  # max_batch: the other 3 waited in the FIFO queue
    assert steps_together < steps_alone / 2
    for one, events in zip(alone, together):
        ids, text, finish = joined(events)
        assert ids == one.token_ids and text == one.text and finish == one.finish_reason == "length"
        assert len(ids) == events[-1].completion_tokens
    assert [len(joined(e)[0]) for e in together] == [5 + 3 * i for i in range(7)]
    assert scheduler.stats()["running"] == 0 and scheduler.stats()["free_slots"] == 4


def test_seeded_sampling_does_not_depend_on_batch_mates(scheduler, tokenizer):
    ps = prompts(tokenizer, 3)
    mixed = [(ps[0], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7, stop_token_ids=())),
             (ps[1], SamplingParams(max_new_tokens=8, **GREEDY)),
             (ps[2], SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, seed=3, stop_token_ids=()))]
    together = run_all(scheduler, mixed)
    for (p, params), events in zip(mixed, together):
        alone = scheduler.generate(p, params)
        assert joined(events)[0] == alone.token_ids
        assert [e for ev in events for e in ev.logprobs] == pytest.approx(alone.logprobs, abs=1e-5)


def test_stop_token_and_stop_string(scheduler, tokenizer):
    p = prompts(tokenizer, 1)[0]
    full = scheduler.generate(p, SamplingParams(max_new_tokens=12, **GREEDY))
    stop_tok = full.token_ids[5]
    by_token = scheduler.generate(p, SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_tok,)))
    first = full.token_ids.index(stop_tok)
    assert by_token.finish_reason == "stop" and by_token.stop_reason == stop_tok
    assert by_token.token_ids == full.token_ids[: first + 1]  # the stop token is returned, its text is not
    assert by_token.text == tokenizer.decode(full.token_ids[:first])

    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    [events] = run_all(scheduler, [(p, SamplingParams(max_new_tokens=12, stop=(stop,), **GREEDY))])
    ids, text, finish = joined(events)
    assert finish == "stop" and events[-1].stop_reason == stop
    assert text == full.text[: full.text.index(stop)]
    assert all(stop not in e.text for e in events)


def test_context_limit_ends_with_length(k2_dir, tokenizer):
    s = make_scheduler(k2_dir, tokenizer, max_batch=2, max_seq_len=16)
    try:
        prompt = tokenizer.encode("the weather in paris is sunny")
        out = s.generate(prompt, SamplingParams(max_new_tokens=100, **GREEDY))
        assert out.finish_reason == "length"
        assert len(out.token_ids) == 16 - len(prompt) + 1  # the last sampled token never enters the cache
        with pytest.raises(ValueError, match="context"):
            s.submit(list(range(2, 18)), SamplingParams(), lambda e: None)
    finally:
        s.shutdown()


def test_cancel_frees_the_slot(scheduler, tokenizer):
    events = queue.SimpleQueue()
    rid = scheduler.submit(prompts(tokenizer, 1)[0], SamplingParams(max_new_tokens=10_000, **GREEDY), events.put)
    events.get(timeout=30)
    assert scheduler.stats()["running"] == 1
    scheduler.cancel(rid)
    deadline = time.monotonic() + 10
    while scheduler.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.stats() | {"steps": 0, "max_running_seen": 0} == {
        "running": 0, "waiting": 0, "free_slots": 4, "steps": 0, "max_running_seen": 0}


def test_engine_error_fails_only_that_request(scheduler, tokenizer):
    bad = scheduler.generate([10**6], SamplingParams(max_new_tokens=3, **GREEDY))  # id outside the vocabulary
    assert bad.finish_reason == "error" and "10" in bad.error
    good = scheduler.generate(prompts(tokenizer, 1)[0], SamplingParams(max_new_tokens=3, **GREEDY))
    assert good.finish_reason == "length" and len(good.token_ids) == 3
    assert scheduler.stats()["free_slots"] == 4


def test_reload_weights_between_steps(k2_dir, k2_dir_other, tokenizer):
    """Requests in flight continue on the new weights; new requests equal a server started on them."""
    p = prompts(tokenizer, 1)[0]
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    fresh = make_scheduler(k2_dir_other, tokenizer)
    expected = fresh.generate(p, params)
    fresh.shutdown()
    s = make_scheduler(k2_dir, tokenizer)
    try:
        before = s.generate(p, params)
        events = queue.SimpleQueue()
        s.submit(p, SamplingParams(max_new_tokens=10_000, **GREEDY), events.put)  # in flight during the swap
        events.get(timeout=30)
        seconds = s.reload_weights(str(k2_dir_other))
        assert seconds > 0
        after = s.generate(p, params)
        assert after.token_ids == expected.token_ids != before.token_ids
        assert events.get(timeout=30).finish_reason is None  # the long request is still being served
        with pytest.raises((ValueError, FileNotFoundError)):
            s.reload_weights(str(k2_dir_other / "missing"))
        assert s.generate(p, params).token_ids == expected.token_ids
    finally:
        s.shutdown()


def test_incremental_detokenizer_never_splits_characters(tokenizer):
    text = "café ✓ 模型 the weather ✓✓ in paris"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer.decode)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_many_threads_submitting(scheduler, tokenizer):
    """Submissions from many threads at once all complete; no slot is lost."""
    results = []

    def client(i):
        results.append(scheduler.generate(prompts(tokenizer, 8)[i], SamplingParams(max_new_tokens=4, **GREEDY)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8 and all(len(r.token_ids) == 4 for r in results)
    assert scheduler.stats()["free_slots"] == 4
