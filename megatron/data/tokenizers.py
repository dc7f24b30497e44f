"""Tokenizers with Megatron-DeepSpeed's names and flags, and one factory for all of them.

`--tokenizer-type` picks the class: GPT2BPETokenizer (`--vocab-file`, `--merge-file`),
SentencePieceTokenizer and Llama2Tokenizer (`--tokenizer-model FILE.model`), HFTokenizer
(`--tokenizer-model DIR_OR_tokenizer.json`, local files only), NullTokenizer (`--vocab-size`).
Every tokenizer offers .vocab_size (unpadded), .eod, .bos/.pad (None when undefined), tokenize,
tokenize_batch (the library's fast batch path), detokenize and save_pretrained_files(dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence
from megatron.fileio import replace_atomically
from megatron.errors import MegatronError

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "Llama2Tokenizer", "HFTokenizer", "NullTokenizer")
ENDOFTEXT = "<|endoftext|>"
_EOS_NAMES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class TokenizerError(MegatronError, ValueError):
    """A tokenizer that cannot be built: the message names the flag and the path."""


def _require_file(path: Optional[str], flag: str, tokenizer_type: str, what: str) -> str:
    if not path:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: file not found ({what} for {tokenizer_type})")
    return path


def _install_files(directory: str, write) -> list[str]:
    """Run write(tmp_dir), then move every file it wrote into `directory` (complete files only)."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-tmp-") as tmp:
        write(tmp)
        written = []
        for name in sorted(os.listdir(tmp)):
            replace_atomically(os.path.join(tmp, name), os.path.join(directory, name))
            written.append(os.path.join(directory, name))
    return written


def _tidy_tokenizer_config(directory: str, tokenizer_class: Optional[str] = None) -> None:
    """Drop load-time keys transformers leaves in tokenizer_config.json; optionally name a portable class
    (PreTrainedTokenizerFast loads a tokenizer.json in transformers 4.x and 5.x alike)."""
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


class MegatronTokenizer:
    """Common interface. Subclasses set vocab_size, eod, bos, pad and implement the four methods."""

    vocab_size: int
    eod: int
    bos: Optional[int] = None
    pad: Optional[int] = None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save_pretrained_files(self, directory: str) -> list[str]:
        """Write a Hugging Face tokenizer directory (loadable by AutoTokenizer); returns the paths written."""
        raise NotImplementedError

    def set_num_threads(self, num_threads: int) -> None:
        """Threads the batch path may use in this process (1 inside multiprocessing workers)."""

    @property
    def chat_template(self) -> Optional[str]:
        """The tokenizer's own chat template (Jinja), or None; only HFTokenizer directories carry one."""
        return None

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False) -> list[int]:
        """Token ids of `messages` ([{"role", "content"}, ...]) rendered by the tokenizer's chat template."""
        raise TokenizerError(f"--tokenizer-type {type(self).__name__} has no chat template to render messages; "
                             "use --tokenizer-type HFTokenizer with a tokenizer directory whose "
                             "tokenizer_config.json (or chat_template.jinja) defines one")

    @property
    def eos(self) -> int:
        return self.eod

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


def _ids_of_encodings(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """tokenizers' fastest batch path (no offsets) where the installed version has it."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [encoding.ids for encoding in encode(list(texts), add_special_tokens=add_special_tokens)]


def _set_tokenizers_threads(num_threads: int) -> None:
    # The Rust library reads this on every batch call; its thread pool size is fixed at first use.
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if num_threads <= 1 else "true"
    if num_threads > 1:
        os.environ.setdefault("RAYON_RS_NUM_CPUS", str(num_threads))


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2 byte-level BPE from vocab.json + merges.txt (tokenizers' BPE with ByteLevel pre-tokenizer).

    eod is `<|endoftext|>`, which must be in vocab.json; vocab_size = len(vocab.json) as in Megatron.
    save_pretrained_files writes vocab.json, merges.txt, tokenizer.json and tokenizer_config.json.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        self.vocab_file = _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer", "GPT-2 vocab.json")
        self.merge_file = _require_file(merge_file, "--merge-file", "GPT2BPETokenizer", "GPT-2 merges.txt")
        try:
            with open(self.vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"--vocab-file {self.vocab_file}: not a JSON vocabulary ({error})") from None
        if ENDOFTEXT not in vocab:
            raise TokenizerError(f"--vocab-file {self.vocab_file}: no {ENDOFTEXT} token, which GPT2BPETokenizer "
                                 "uses as end of document; train with tools/train_tokenizer.py --type bpe")
        try:
            model = models.BPE.from_file(self.vocab_file, self.merge_file)
        except Exception as error:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"--merge-file {self.merge_file}: cannot build BPE from it and "
                                 f"{self.vocab_file}: {error}") from None
        self._tokenizer = Tokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer.add_special_tokens([ENDOFTEXT])
        self.vocab_size = len(vocab)
        self.eod = vocab[ENDOFTEXT]
        self.vocab = vocab

    def tokenize_batch(self, texts):
        return _ids_of_encodings(self._tokenizer, texts, add_special_tokens=False)

    def detokenize(self, ids):
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def set_num_threads(self, num_threads):
        _set_tokenizers_threads(num_threads)

    def save_pretrained_files(self, directory):
        from transformers import PreTrainedTokenizerFast

        def write(tmp):
            shutil.copyfile(self.vocab_file, os.path.join(tmp, "vocab.json"))
            shutil.copyfile(self.merge_file, os.path.join(tmp, "merges.txt"))
            hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer, bos_token=ENDOFTEXT,
                                         eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
            hf.save_pretrained(tmp)
            _tidy_tokenizer_config(tmp, "PreTrainedTokenizerFast")
        return _install_files(directory, write)


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece .model with Megatron's extra special tokens.

    Like Megatron's `_SentencePieceTokenizer`, the tokens <CLS>, <SEP>, <EOD>, <MASK> (and <PAD>,
    <BOS>, <EOS> when the model defines no pad/bos/eos id) get ids after the model's pieces when the
    model lacks them, so vocab_size may exceed the model's piece count; eod is <EOD>'s id. Those
    strings in the text are tokenized as their special ids. save_pretrained_files writes
    tokenizer.model plus a tokenizer.json converted by transformers and its config.
    """

    def __init__(self, model_file: str, _flag: str = "--tokenizer-model"):
        import sentencepiece

        self.model_file = _require_file(model_file, _flag, type(self).__name__, "SentencePiece .model file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as error:
            raise TokenizerError(f"{_flag} {self.model_file}: not a SentencePiece model ({error})") from None
        self._num_threads = -1
        self._initialize()

    def _initialize(self) -> None:
        sp = self._sp
        self.vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self.inv_vocab = {i: piece for piece, i in self.vocab.items()}
        self._special_tokens: dict[str, int] = {}

        def special(token: str) -> int:
            if token not in self.vocab:
                self.inv_vocab[len(self.vocab)] = token
                self.vocab[token] = len(self.vocab)
            self._special_tokens[token] = self.vocab[token]
            return self.vocab[token]

        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            special(token)
        self.pad = sp.pad_id() if sp.pad_id() >= 0 else special("<PAD>")
        self.bos = sp.bos_id() if sp.bos_id() >= 0 else special("<BOS>")
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else special("<EOS>")
        for id_, name in ((sp.pad_id(), "pad"), (sp.bos_id(), "bos"), (sp.eos_id(), "eos")):
            if id_ >= 0:
                self._special_tokens[sp.id_to_piece(id_)] = id_
        self.eod = self.vocab["<EOD>"]
        self.vocab_size = len(self.vocab)
        self._added_ids = {i for i in self.inv_vocab if i >= sp.get_piece_size()}
        names = sorted(self._special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(re.escape(name) for name in names)) if names else None

    @property
    def eos(self) -> int:
        return self.eos_id

    def set_num_threads(self, num_threads):
        self._num_threads = num_threads

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self._num_threads)

    def tokenize_batch(self, texts):
        texts = list(texts)
        pattern = self._special_pattern
        plain = [i for i, text in enumerate(texts) if not pattern.search(text)]
        if len(plain) == len(texts):
            return self._encode(texts)
        results: list = [None] * len(texts)
        for i, ids in zip(plain, self._encode([texts[i] for i in plain])):
            results[i] = ids
        for i, text in enumerate(texts):
            if results[i] is None:
                results[i] = self._tokenize_with_specials(text)
        return results

    def _tokenize_with_specials(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in self._special_pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode(text[start:match.start()]))
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def detokenize(self, ids):
        text, run = [], []
        for i in ids:
            i = int(i)
            if i in self._added_ids:
                if run:
                    text.append(self._sp.decode(run))
                    run = []
                text.append(self.inv_vocab[i])
            else:
                run.append(i)
        if run:
            text.append(self._sp.decode(run))
        return "".join(text)

    def _hf_special_tokens(self) -> dict:
        sp = self._sp
        return {"unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
                "bos_token": self.inv_vocab[self.bos], "eos_token": self.inv_vocab[self.eos_id],
                "pad_token": self.inv_vocab[self.pad]}

    def _hf_tokenizer(self, model_directory: str):
        from transformers import LlamaTokenizer

        roles = self._hf_special_tokens()
        in_model = {role: token for role, token in roles.items()
                    if token is not None and self.vocab[token] < self._sp.get_piece_size()}
        hf = LlamaTokenizer.from_pretrained(model_directory, local_files_only=True, legacy=False,
                                            add_bos_token=False, add_eos_token=False,
                                            **{role: in_model.get(role) for role in roles})
        extra = [token for i, token in sorted(self.inv_vocab.items()) if i in self._added_ids]
        if extra:  # appended in our id order, then given their roles (pad/bos/eos when the model lacks them)
            hf.add_special_tokens({"additional_special_tokens": extra})
            hf.add_special_tokens({role: token for role, token in roles.items()
                                   if token is not None and role not in in_model})
        wrong = [token for token in extra if hf.convert_tokens_to_ids(token) != self.vocab[token]]
        if wrong:
            raise TokenizerError(f"{self.model_file}: transformers numbered the extra tokens {wrong} differently "
                                 "from Megatron; cannot export a matching Hugging Face tokenizer")
        return hf

    def save_pretrained_files(self, directory):
        """Writes tokenizer.model (a copy), tokenizer.json (converted by transformers' LlamaTokenizer,
        with Megatron's extra tokens added as special tokens) and tokenizer_config.json."""
        def write(tmp):
            with tempfile.TemporaryDirectory() as model_directory:  # only the .model: no stray HF files
                shutil.copyfile(self.model_file, os.path.join(model_directory, "tokenizer.model"))
                self._hf_tokenizer(model_directory).save_pretrained(tmp)
            shutil.copyfile(self.model_file, os.path.join(tmp, "tokenizer.model"))
            _tidy_tokenizer_config(tmp)
        return _install_files(directory, write)


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama-2's SentencePiece model used as Megatron does: bos prepended to every document, eod = eos.

    No extra tokens: vocab_size is the model's piece count; pad is the model's pad id (None if unset).
    `--append-eod` in preprocessing then gives [bos] + text + [eos] per document.
    """

    def _initialize(self) -> None:
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        self.bos = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"--tokenizer-model {self.model_file}: the model defines no eos id, which "
                                 "Llama2Tokenizer uses as end of document")
        self.eod = self.eos_id
        self.pad = sp.pad_id() if sp.pad_id() >= 0 else None
        self._added_ids = set()

    def tokenize_batch(self, texts, bos: bool = True, eos: bool = False):
        return self._sp.encode(list(texts), add_bos=bos and self.bos is not None, add_eos=eos,
                               num_threads=self._num_threads)

    def tokenize(self, text, bos: bool = True, eos: bool = False):
        return self.tokenize_batch([text], bos=bos, eos=eos)[0]

    def detokenize(self, ids):
        return self._sp.decode([int(i) for i in ids])

    def _hf_special_tokens(self) -> dict:
        sp = self._sp
        return {"unk_token": sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
                "bos_token": sp.id_to_piece(self.bos) if self.bos is not None else None,
                "eos_token": sp.id_to_piece(self.eos_id),
                "pad_token": sp.id_to_piece(self.pad) if self.pad is not None else None}

    def _hf_tokenizer(self, model_directory: str):
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(model_directory, local_files_only=True, legacy=False,
                                              add_bos_token=self.bos is not None, add_eos_token=False,
                                              **self._hf_special_tokens())  # None: no such token, none added


class HFTokenizer(MegatronTokenizer):
    """Any local Hugging Face tokenizer: a directory (AutoTokenizer, local_files_only) or a tokenizer.json.

    tokenize adds the tokenizer's own special tokens (e.g. Llama's bos) as Megatron's HFTokenizer does;
    eod is eos (else sep); vocab_size = len(tokenizer) including added tokens.
    save_pretrained_files calls the tokenizer's save_pretrained.
    """

    def __init__(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not path:
            raise TokenizerError("--tokenizer-type HFTokenizer needs --tokenizer-model (a local tokenizer "
                                 "directory or tokenizer.json file; nothing is downloaded)")
        self.path = path
        try:
            if os.path.isfile(path):
                self._tokenizer = PreTrainedTokenizerFast(tokenizer_file=path)
            elif os.path.isdir(path):
                # --trust-remote-code: a directory whose tokenizer_config.json names its own tokenizer class
                # (auto_map) needs transformers to import that Python file from the directory
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                                trust_remote_code=trust_remote_code)
            else:
                raise TokenizerError(f"--tokenizer-model {path}: no such file or directory (HFTokenizer loads "
                                     "local tokenizers only; copy the tokenizer files here first)")
        except TokenizerError:
            raise
        except Exception as error:
            hint = ("; it ships its own tokenizer code: pass --trust-remote-code to run it (only for a directory "
                    "you trust)") if "trust_remote_code" in str(error) and not trust_remote_code else ""
            raise TokenizerError(f"--tokenizer-model {path}: cannot load a Hugging Face tokenizer from it "
                                 f"({type(error).__name__}: {error}){hint}") from None
        tok = self._tokenizer
        if tok.eos_token is None:  # a bare tokenizer.json carries no special-token roles: recognise the usual ones
            vocab = tok.get_vocab()
            tok.eos_token = next((name for name in _EOS_NAMES if name in vocab), None)
        self.vocab_size = len(tok)
        eod = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eod is None:
            raise TokenizerError(f"--tokenizer-model {path}: the tokenizer has neither an eos nor a sep token "
                                 "to use as end of document")
        self.eod = eod
        self.bos = tok.bos_token_id
        self.pad = tok.pad_token_id
        self._backend = getattr(tok, "backend_tokenizer", None)

    def tokenize_batch(self, texts):
        if self._backend is not None:
            return _ids_of_encodings(self._backend, texts, add_special_tokens=True)
        return self._tokenizer(list(texts))["input_ids"]

    def detokenize(self, ids):
        return self._tokenizer.decode(list(ids))

    def set_num_threads(self, num_threads):
        _set_tokenizers_threads(num_threads)

    @property
    def chat_template(self):
        return getattr(self._tokenizer, "chat_template", None) or None

    def apply_chat_template(self, messages, add_generation_prompt=False):
        if not self.chat_template:
            raise TokenizerError(f"--tokenizer-model {self.path}: this Hugging Face tokenizer has no chat template "
                                 "to render messages; use a tokenizer directory whose tokenizer_config.json (or "
                                 "chat_template.jinja) defines one, or give the examples as plain "
                                 '{"prompt", "response"} strings')
        # transformers renders and tokenizes as TRL's _tokenize does (return_dict: the ids under "input_ids")
        return list(self._tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                        add_generation_prompt=add_generation_prompt)["input_ids"])

    def save_pretrained_files(self, directory):
        return _install_files(directory, self._tokenizer.save_pretrained)


class NullTokenizer(MegatronTokenizer):
    """Text is whitespace-separated integer ids; `--vocab-size V` gives V + 1 tokens, the end-of-document id
    being V (argonne-lcf/Megatron-DeepSpeed's megatron/tokenizer/tokenizer.py _NullTokenizer).

    `eod_in_vocab_size=True` is this framework's older convention (V tokens, end of document V - 1), kept for
    resuming checkpoints saved with it (checkpoint/resume.py recognises them; docs/UPSTREAM.md). Has no files
    to save.
    """

    def __init__(self, vocab_size: Optional[int], eod_in_vocab_size: bool = False):
        least = 2 if eod_in_vocab_size else 1
        if vocab_size is None or int(vocab_size) < least:
            raise TokenizerError(f"--tokenizer-type NullTokenizer needs --vocab-size >= {least} (got {vocab_size})")
        self.vocab_size = int(vocab_size) + (0 if eod_in_vocab_size else 1)
        self.eod = self.vocab_size - 1

    def tokenize_batch(self, texts):
        results = []
        for text in texts:
            try:
                ids = [int(token) for token in text.split()]
            except ValueError as error:
                raise ValueError(f"NullTokenizer expects whitespace-separated integers: {error}") from None
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                bad = next(i for i in ids if not 0 <= i < self.vocab_size)
                raise ValueError(f"NullTokenizer: id {bad} outside the vocabulary [0, {self.vocab_size})")
            results.append(ids)
        return results

    def detokenize(self, ids):
        return " ".join(str(int(i)) for i in ids)

    def save_pretrained_files(self, directory):
        raise TokenizerError("NullTokenizer has no vocabulary files to write to a Hugging Face directory; "
                             "convert with a real tokenizer (--tokenizer-type HFTokenizer, ...)")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, vocab_size: Optional[int] = None,
                    trust_remote_code: bool = False) -> MegatronTokenizer:
    """The tokenizer named by `--tokenizer-type`, from the flag values Megatron-DeepSpeed uses."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(tokenizer_model, trust_remote_code=trust_remote_code)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}")


def build_tokenizer_from_config(data_config) -> MegatronTokenizer:
    """build_tokenizer from a `megatron.config.DataConfig`."""
    if not data_config.tokenizer_type:
        raise TokenizerError("no --tokenizer-type given; choose one of " + ", ".join(TOKENIZER_TYPES))
    return build_tokenizer(data_config.tokenizer_type, tokenizer_model=data_config.tokenizer_model,
                           vocab_file=data_config.vocab_file, merge_file=data_config.merge_file,
                           vocab_size=data_config.vocab_size, trust_remote_code=data_config.trust_remote_code)
