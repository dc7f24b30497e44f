"""Where tokens come from: the blend of tokenized files, the split, the tokenizer, and mock data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    # Megatron's `--data-path`: a single prefix, or "w1 prefix1 w2 prefix2 ..." as a list of strings.
    data_path: list[str] = field(default_factory=list)
    # `--data-file-list FILE`: lines "weight prefix [corpus]", '#' comments and blank lines allowed.
    data_file_list: Optional[str] = None
    split: str = "969,30,1"  # train,valid,test weights over each file's documents
    # "samples": our arithmetic index (samples are consecutive windows of each file's token stream);
    # "documents": Megatron's document-shuffled index, built lazily per file.
    sample_mode: str = "samples"
    # `--document-shuffle-block N` (documents mode): files with more than N documents in a split are shuffled
    # per epoch in blocks of N consecutive documents (block order and order within each block); 0: one
    # shuffle of all a file's documents (Megatron's distribution, O(documents) per file and epoch).
    document_shuffle_block: int = 8192
    # `--train-data-path` / `--valid-data-path` / `--test-data-path`: each split its own blend of whole
    # files ("w1 prefix1 ..." like --data-path), instead of cutting --data-path's files with --split.
    train_data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    test_data_path: list[str] = field(default_factory=list)
    # `--data-cache-path`: where documents mode shares its per-file document indices between the ranks
    # (default: node-local /dev/shm); the blend itself is arithmetic and needs no cache.
    data_cache_path: Optional[str] = None
    blend_epochs_warning: float = 4.0  # the blend report warns about corpora repeated more often
    mock_data: bool = False  # deterministic random tokens; needs vocab_size
    tokenizer_type: Optional[str] = None  # GPT2BPETokenizer, SentencePieceTokenizer, Llama2Tokenizer, HFTokenizer, NullTokenizer
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None  # NullTokenizer / mock data
    num_workers: int = 2  # DataLoader workers per rank
    multiprocessing_context: str = "fork"  # how DataLoader workers start: fork, spawn or forkserver
    trust_remote_code: bool = False  # HFTokenizer: let transformers run the tokenizer's own Python code
    reset_position_ids: bool = False
    reset_attention_mask: bool = False  # attention causal within each document (a new one after each EOD)
    eod_mask_loss: bool = False
