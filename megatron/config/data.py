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
    mock_data: bool = False  # deterministic random tokens; needs vocab_size
    tokenizer_type: Optional[str] = None  # GPT2BPETokenizer, SentencePieceTokenizer, Llama2Tokenizer, HFTokenizer, NullTokenizer
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    vocab_size: Optional[int] = None  # NullTokenizer / mock data
    num_workers: int = 2  # DataLoader workers per rank
    reset_position_ids: bool = False
    eod_mask_loss: bool = False
