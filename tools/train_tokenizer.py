"""Train a tokenizer on jsonl text, since no model hub is reachable: byte-level BPE or SentencePiece.

    python tools/train_tokenizer.py --input 'data/corpus/*/*.jsonl' --type bpe --vocab-size 8192 \\
        --output-dir data/tokenizer
BPE writes vocab.json + merges.txt (for --tokenizer-type GPT2BPETokenizer) and tokenizer.json (for
HFTokenizer), with <|endoftext|> as end of document. SentencePiece writes tokenizer.model (for
SentencePieceTokenizer / Llama2Tokenizer) with unk=0, bos=1, eos=2, pad=3.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.preprocess_data import expand_input_paths, iter_json_texts  # noqa: E402
from megatron.errors import MegatronError  # noqa: E402
from megatron.fileio import replace_atomically  # noqa: E402

ENDOFTEXT = "<|endoftext|>"


def train_bpe(texts, vocab_size: int, output_dir: str, min_frequency: int = 2) -> list[str]:
    """GPT-2 style byte-level BPE; returns the files written (vocab.json, merges.txt, tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True,
                                  special_tokens=[ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".train-tmp-") as tmp:
        tokenizer.model.save(tmp)  # vocab.json, merges.txt
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        written = []
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            replace_atomically(os.path.join(tmp, name), os.path.join(output_dir, name))
            written.append(os.path.join(output_dir, name))
    return written


def _chunks_of(texts, max_chars: int):
    """SentencePiece trains on "sentences" of bounded length: feed runs of whole lines (newlines and
    indentation kept, so code round-trips) of at most max_chars characters; longer lines are cut."""
    for text in texts:
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if size + len(line) > max_chars and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk and "".join(chunk).strip():
            yield "".join(chunk)


def train_sentencepiece(texts, vocab_size: int, output_dir: str, model_type: str = "bpe",
                        model_name: str = "tokenizer", max_sentences: int = 2_000_000,
                        num_threads: int = os.cpu_count() or 1) -> list[str]:
    """A SentencePiece model written as OUTPUT_DIR/MODEL_NAME.model: Llama-like (byte fallback, split
    digits, no normalization, whitespace kept) so that source code and its indentation round-trip."""
    import sentencepiece

    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".train-tmp-") as tmp:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_chunks_of(texts, 2000), model_prefix=os.path.join(tmp, model_name),
            vocab_size=vocab_size, model_type=model_type, character_coverage=0.9999, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=16384,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
            hard_vocab_limit=False)
        written = []
        for suffix in (".model", ".vocab"):
            target = os.path.join(output_dir, model_name + suffix)
            replace_atomically(os.path.join(tmp, model_name + suffix), target)
            written.append(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+",
                        help="jsonl files (plain or .gz), directories or globs (quote globs)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose strings are trained on")
    parser.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")
    parser.add_argument("--sentencepiece-model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--model-name", default="tokenizer", help="SentencePiece: writes NAME.model")
    parser.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vocab_size < 300 and args.type == "bpe":
        parser.error(f"--vocab-size {args.vocab_size}: byte-level BPE needs at least 257 ids (256 bytes + "
                     "<|endoftext|>); use >= 300")  # exit 2, as every bad input
    try:
        paths = expand_input_paths(args.input)
        os.makedirs(args.output_dir, exist_ok=True)
    except MegatronError as error:  # --input matching no file: the message names it
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--output-dir {args.output_dir}: cannot create it ({error.strerror}); choose a writable "
                     "directory")
    texts = iter_json_texts(paths, args.json_keys, max_docs=args.max_docs)
    start = time.time()
    try:
        if args.type == "bpe":
            written = train_bpe(texts, args.vocab_size, args.output_dir, args.min_frequency)
            usage = (f"--tokenizer-type GPT2BPETokenizer --vocab-file {written[0]} --merge-file {written[1]}  "
                     f"(or --tokenizer-type HFTokenizer --tokenizer-model {written[2]})")
        else:
            written = train_sentencepiece(texts, args.vocab_size, args.output_dir, args.sentencepiece_model_type,
                                          args.model_name)
            usage = f"--tokenizer-type SentencePieceTokenizer|Llama2Tokenizer --tokenizer-model {written[0]}"
    except MegatronError as error:  # a malformed input line: the message names the file and the line
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return error.exit_code
    except RuntimeError as error:  # SentencePiece's trainer refusing the vocabulary size for this text
        reason = str(error).split("] ")[-1].strip()
        if args.type != "sentencepiece" or "ocabulary size" not in reason:
            raise
        print(f"train_tokenizer.py: error: --vocab-size {args.vocab_size} does not fit this text: {reason} "
              "(SentencePiece); change --vocab-size or give more text", file=sys.stderr)
        return 2
    print(f"trained a {args.type} tokenizer ({args.vocab_size} ids) on {len(paths)} file(s) in "
          f"{time.time() - start:.1f}s; wrote {', '.join(written)}")
    print(f"use it with: {usage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
