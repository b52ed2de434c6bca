"""Pre-training data (issue 4 item 1): corpora, tokenizers, tokenised shards and resumable batches."""

from openk2.data.corpus import corpus_files, iter_documents, prepare_default_corpus
from openk2.data.shards import BatchSampler, TokenShards, validation_batches, write_shards
from openk2.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS", "BatchSampler", "TokenShards", "Tokenizer", "corpus_files", "iter_documents",
    "load_tokenizer", "prepare_default_corpus", "train_tokenizer", "validation_batches", "write_shards",
]
