"""Tiny served models for the server tests: a random K2 model with a BPE tokenizer trained on a few KB."""

import random
from pathlib import Path

import pytest
import torch

from openk2 import K2ForCausalLM, preset
from openk2.data.tokenizer import train_tokenizer

WORDS = ("the weather in paris is sunny and warm while the model reads tokens and calls a tool to get "
         "the time in tokyo; experts route each token to a few of many matrices").split()


def tiny_k2_dir(root: Path, seed: int = 0) -> Path:
    """A hub-layout folder: a 2-layer random K2 model and a 512-token tokenizer (vocab matches the config)."""
    rng = random.Random(0)  # the same tokenizer for every seed
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + " {\"city\": \"Paris\"} café ✓"
            for _ in range(200)]
    tokenizer = train_tokenizer(docs, vocab_size=512, progress=False)
    config = preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2, hidden_size=64,
                                    intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                                    num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                    initializer_range=0.08, max_position_embeddings=2048)
    torch.manual_seed(seed)
    K2ForCausalLM(config).save_pretrained(root)
    tokenizer.save(root)
    return root


@pytest.fixture(scope="session")
def k2_dir(tmp_path_factory) -> Path:
    return tiny_k2_dir(tmp_path_factory.mktemp("tiny_k2"))


@pytest.fixture(scope="session")
def k2_dir_other(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as k2_dir, other weights (for weight reloads)."""
    return tiny_k2_dir(tmp_path_factory.mktemp("tiny_k2_other"), seed=1)


class ServerThread:
    """uvicorn serving an app in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.app = app
        # port 0: the OS picks a free one. (Handing uvicorn a pre-bound socket instead made every request take
        # ~45 ms here, against ~2 ms this way.)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = ""

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Block until no request runs or waits; returns the scheduler's stats."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            stats = self.scheduler.stats()
            if (stats["running"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


@pytest.fixture(scope="session")
def k2_server(k2_dir):
    from openk2.serve.app import create_app
    from openk2.serve.loading import load_served_model

    served = load_served_model(k2_dir, max_batch=4, max_seq_len=1024, served_name="tiny-k2")
    with ServerThread(create_app(served)) as server:
        yield server


@pytest.fixture(scope="session")
def client(k2_server):
    import openai

    return openai.OpenAI(base_url=k2_server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
