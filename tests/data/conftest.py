import random

import pytest

from openk2.data.tokenizer import train_tokenizer

WORDS = ("the model reads tokens and writes text while experts route each token to a few of many "
         "matrices; attention heads keep their logits bounded by clipping queries and keys").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n small distinct documents of English-like text, some with code and non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 6))]
        if i % 7 == 0:
            sentences.append(f"def f{i}(x):\n    return x * {i}  # café 模型 ✓")
        docs.append(f"Document {i}. " + " ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(80)


@pytest.fixture(scope="session")
def tokenizer(docs):
    return train_tokenizer(docs, vocab_size=512, progress=False)
