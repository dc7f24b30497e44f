"""Where tokens come from: the blend of tokenized files, the split, the tokenizer, and mock data; the data flags
(`add_data_arguments`, `add_data_blend_arguments`, `add_post_training_data_arguments`) and `data_from_args`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from megatron.config.argtypes import non_negative_int, pos_float, pos_int


@dataclass
class DataConfig:
    # Megatron's `--data-path`: a single prefix, or "w1 prefix1 w2 prefix2 ..." as a list of strings.
    data_path: list[str] = field(default_factory=list)
    # `--data-file-list FILE`: lines "weight prefix [corpus]", '#' comments and blank lines allowed.
    data_file_list: Optional[str] = None
    split: str = "969,30,1"  # train,valid,test weights over each file's documents
    # "samples": our arithmetic index (samples are consecutive windows of each file's token stream);
    # "documents": Megatron's document-shuffled index, built lazily per file; "upstream": argonne-lcf/Megatron-
    # DeepSpeed's exact order (megatron/data/upstream_order.py). sample_mode_given: --sample-mode was typed
    # (otherwise resuming an upstream checkpoint picks "upstream").
    sample_mode: str = "samples"
    sample_mode_given: bool = False
    # upstream mode: upstream's --shuffle-sample-in-corpus / --blend-sample-in-corpus (see their --help)
    shuffle_sample_in_corpus: bool = False
    blend_sample_in_corpus: bool = False
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
    # Post-training data (finetune_gpt.py only; megatron/data/post_training.py): several examples per sequence
    # with document masks, or one example per sequence, padded; what to do with an example longer than a sequence.
    packing: bool = False
    overlong_examples: str = "truncate"  # "truncate" (keep the first seq_length + 1 tokens) or "drop"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--data-file-list", help="file of 'weight prefix [corpus]' lines")
    g.add_argument("--split", default=DataConfig.split)
    g.add_argument("--sample-mode", choices=("samples", "documents", "upstream"), default=None,
                   help="upstream = argonne-lcf/Megatron-DeepSpeed's exact sample order (the default when --load "
                        "is an upstream checkpoint); else samples (default) or documents. upstream: its doc_idx/"
                        "sample_idx/shuffle_idx per file and its greedy blend over the corpora of a --data-file-list, "
                        "so that a run resumed from an upstream checkpoint reads the samples upstream would have "
                        "read; samples: consecutive windows of each file, our arithmetic blend; documents: "
                        "Megatron's document-shuffled samples")
    g.add_argument("--document-shuffle-block", type=non_negative_int, default=DataConfig.document_shuffle_block,
                   metavar="N",
                   help="--sample-mode documents: a file with more than N documents in a split is shuffled each "
                        "epoch in blocks of N consecutive documents (cut at a new place each epoch), the blocks in "
                        "a shuffled order and the documents in a shuffled order inside each block, so that a "
                        "sample costs O(N + documents / N) to place, not a shuffle of the whole file. 0: one "
                        "shuffle of all the file's documents, Megatron's distribution (a full index per file and "
                        "epoch). Files of at most N documents get that one shuffle either way")
    g.add_argument("--mock-data", action="store_true", help="random tokens, no corpus (needs --vocab-size)")
    g.add_argument("--tokenizer-type")
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=pos_int)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--multiprocessing-context", choices=("fork", "spawn", "forkserver"), default="fork",
                   help="how DataLoader workers (--num-workers > 0) start (default fork, as upstream)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="HFTokenizer: let transformers run Python code shipped with the tokenizer directory "
                        "(custom tokenizer classes); off by default")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention is causal within each document: a token never attends to tokens before the "
                        "last EOD preceding it (needs a tokenizer with an EOD token). SDPA then takes an explicit [b, 1, s, s] mask, which "
                        "rules out its flash kernel")
    g.add_argument("--data-impl", choices=("mmap", "infer", "lazy", "cached"), default="infer",
                   help="the only format is MMIDIDX (.bin/.idx): mmap or infer")
    g.add_argument("--dataloader-type", choices=("single", "cyclic"), default="single",
                   help="single: one pass over the blended index (cyclic is not supported)")


def add_data_blend_arguments(parser: argparse.ArgumentParser) -> None:
    """Per-split blends, corpus mixing, index sharing, the blend report (issue #11)."""
    g = parser.add_argument_group("data: per-split blends and the blend report")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=[],
                       help=f"the {split} split's own blend (PREFIX, or W1 PREFIX1 ...), whole files; replaces "
                            "--data-path/--data-file-list and --split")
    g.add_argument("--shuffle-sample-in-corpus", action="store_true",
                   help="--sample-mode upstream: permute each corpus's samples (upstream's meaning: a RandomState("
                        "seed) shuffle of the corpus's samples; without it a corpus serves its files' samples in "
                        "order). Other modes: always on (the blend interleaves every corpus's files sample by "
                        "sample over the whole run)")
    g.add_argument("--blend-sample-in-corpus", action="store_true",
                   help="--sample-mode upstream: a corpus's files are blended by their sample counts (upstream's "
                        "greedy blend) instead of laid end to end. Other modes: always on (the blend interleaves "
                        "every file by its weight)")
    g.add_argument("--repeated-dataloader", action="store_true",
                   help="always on here: each split's dataset holds every sample the run asks for, repeating "
                        "files in new orders as needed, so the data iterator never runs out")
    g.add_argument("--data-cache-path",
                   help="no index cache is needed: the blend is arithmetic (computed from the file list, seed "
                        "and seq length in milliseconds). With --sample-mode documents this directory holds the "
                        "per-file document indices the ranks share (default: node-local /dev/shm). With "
                        "--sample-mode upstream, upstream's own blend indices found here (as its runs leave them) are read "
                        "as upstream reads them on a resume; otherwise its order is recomputed from the files and "
                        "the greedy blend's running counts are kept here (8 bytes per corpus every 4,096 samples), "
                        "so that a later resume of the same run need not recompute the blend from sample 0")
    g.add_argument("--blend-epochs-warning", type=pos_float, default=4.0,
                   help="the start-up blend report warns about every corpus repeated more than this many "
                        "times (default 4)")


OVERLONG_CHOICES = ("truncate", "drop")


def add_post_training_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The post-training data flags (docs/POST_TRAINING.md); only finetune_gpt.py's parser has them."""
    g = parser.add_argument_group("post-training data (--task sft|dpo)")
    g.add_argument("--packing", action="store_true",
                   help="pack several examples into each sequence of --seq-length, each attending only to itself "
                        "(document ids and position ids restart per example, as --reset-attention-mask and "
                        "--reset-position-ids do); default: one example per sequence, padded. DPO packs whole pairs: "
                        "a row pair holds the chosen sequences of its pairs in one row and their rejected ones, in "
                        "the same order, in the other")
    g.add_argument("--overlong-examples", choices=OVERLONG_CHOICES, default=DataConfig.overlong_examples,
                   help="an example longer than --seq-length + 1 tokens: 'truncate' keeps its first "
                        "--seq-length + 1 tokens (dropped anyway if no response token is left), 'drop' leaves it "
                        "out; the counts are logged at start (default truncate)")


def data_from_args(ns: argparse.Namespace) -> DataConfig:
    return DataConfig(
        data_path=list(ns.data_path), data_file_list=ns.data_file_list, split=ns.split,
        sample_mode=ns.sample_mode or "samples", sample_mode_given=ns.sample_mode is not None,
        shuffle_sample_in_corpus=ns.shuffle_sample_in_corpus, blend_sample_in_corpus=ns.blend_sample_in_corpus,
        document_shuffle_block=ns.document_shuffle_block, mock_data=ns.mock_data, tokenizer_type=ns.tokenizer_type,
        tokenizer_model=ns.tokenizer_model, vocab_file=ns.vocab_file, merge_file=ns.merge_file,
        vocab_size=ns.vocab_size, num_workers=ns.num_workers, multiprocessing_context=ns.multiprocessing_context,
        trust_remote_code=ns.trust_remote_code, reset_position_ids=ns.reset_position_ids,
        eod_mask_loss=ns.eod_mask_loss, reset_attention_mask=ns.reset_attention_mask,
        train_data_path=list(ns.train_data_path),
        valid_data_path=list(ns.valid_data_path), test_data_path=list(ns.test_data_path),
        data_cache_path=ns.data_cache_path, blend_epochs_warning=ns.blend_epochs_warning,
        # set by finetune_gpt.py's parser only (add_post_training_data_arguments)
        packing=getattr(ns, "packing", False),
        overlong_examples=getattr(ns, "overlong_examples", DataConfig.overlong_examples))
