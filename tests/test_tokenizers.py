"""Tests for megatron/data/tokenizers.py and tools/train_tokenizer.py: ids, special tokens, HF export, errors."""

import inspect
import json
import textwrap

import pytest

from megatron.config import DataConfig
from megatron.data.tokenizers import NullTokenizer, TokenizerError, build_tokenizer, build_tokenizer_from_config
from tools.train_tokenizer import main as train_tokenizer_main

SAMPLE = "def area(r):\n    \"\"\"Circle área.\"\"\"\n\treturn 3.14159 * r ** 2  # 漢字 ok\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte-level BPE and a tiny SentencePiece model, trained with the CLI on stdlib text."""
    root = tmp_path_factory.mktemp("tokenizers")
    corpus = root / "train.jsonl"
    with open(corpus, "w") as f:
        for module in (json, textwrap, inspect):
            f.write(json.dumps({"text": inspect.getsource(module)}) + "\n")
    assert train_tokenizer_main(["--input", str(corpus), "--type", "bpe", "--vocab-size", "600",
                                 "--output-dir", str(root / "bpe")]) == 0
    assert train_tokenizer_main(["--input", str(root), "--type", "sentencepiece", "--vocab-size", "700",
                                 "--output-dir", str(root / "sp")]) == 0
    return root


def test_gpt2_bpe_round_trips_text_and_uses_endoftext_as_eod(trained):
    bpe = trained / "bpe"
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe / "vocab.json"), merge_file=str(bpe / "merges.txt"))
    assert tok.vocab_size == len(json.load(open(bpe / "vocab.json"))) <= 600
    assert tok.eod == json.load(open(bpe / "vocab.json"))["<|endoftext|>"] and tok.eos == tok.eod
    ids = tok.tokenize(SAMPLE)
    assert tok.detokenize(ids) == SAMPLE and len(ids) < len(SAMPLE.encode())  # merges were learned
    assert tok.tokenize_batch([SAMPLE, "", "x"]) == [ids, [], tok.tokenize("x")]
    assert tok.tokenize("a<|endoftext|>b")[1] == tok.eod


def test_sentencepiece_adds_megatron_special_tokens_after_the_model_pieces(trained):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(trained / "sp" / "tokenizer.model"))
    assert (tok.bos, tok.eos, tok.pad) == (1, 2, 3)  # as trained: unk 0, bos 1, eos 2, pad 3
    assert tok.vocab_size == 704 and tok.eod == 702  # <CLS> <SEP> <EOD> <MASK> appended to 700 pieces
    ids = tok.tokenize(SAMPLE)
    assert max(ids) < 700 and tok.detokenize(ids) == SAMPLE  # identity normalisation keeps code intact
    with_eod = tok.tokenize("x = 1<EOD>y")
    assert tok.eod in with_eod and tok.detokenize(with_eod) == "x = 1<EOD>y"
    assert tok.tokenize_batch(["x = 1<EOD>y", SAMPLE]) == [with_eod, ids]


def test_llama2_prepends_bos_and_ends_documents_with_eos(trained):
    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=str(trained / "sp" / "tokenizer.model"))
    assert tok.vocab_size == 700 and tok.eod == 2 and tok.bos == 1 and tok.pad == 3
    ids = tok.tokenize(SAMPLE)
    assert ids[0] == 1 and tok.detokenize(ids) == SAMPLE
    assert tok.tokenize(SAMPLE, bos=False, eos=True) == ids[1:] + [2]
    assert tok.tokenize_batch([SAMPLE, "a"]) == [ids, tok.tokenize("a")]


def test_hf_export_loads_in_transformers_with_the_same_ids(trained, tmp_path):
    from transformers import AutoTokenizer

    bpe, model = trained / "bpe", str(trained / "sp" / "tokenizer.model")
    tokenizers = {
        "gpt2": build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe / "vocab.json"),
                                merge_file=str(bpe / "merges.txt")),
        "sp": build_tokenizer("SentencePieceTokenizer", tokenizer_model=model),
        "llama2": build_tokenizer("Llama2Tokenizer", tokenizer_model=model),
    }
    for name, tok in tokenizers.items():
        written = tok.save_pretrained_files(str(tmp_path / name))
        assert any(path.endswith("tokenizer.json") for path in written), written
        hf = AutoTokenizer.from_pretrained(str(tmp_path / name), local_files_only=True)
        assert hf(SAMPLE)["input_ids"] == tok.tokenize(SAMPLE), name
        assert len(hf) == tok.vocab_size, name
        # and our HFTokenizer reads the exported directory back with the same ids and eod
        again = build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / name))
        assert again.tokenize(SAMPLE) == tok.tokenize(SAMPLE) and again.vocab_size == tok.vocab_size
    assert build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / "gpt2")).eod == tokenizers["gpt2"].eod
    assert build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / "llama2")).eod == 2


def test_sentencepiece_without_pad_or_bos_numbers_the_added_tokens_like_megatron(trained, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    (tmp_path / "lines.txt").write_text(inspect.getsource(textwrap) + inspect.getsource(json))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "lines.txt"), model_prefix=str(tmp_path / "bare"), vocab_size=400,
        bos_id=-1, pad_id=-1, eos_id=1, unk_id=0, byte_fallback=True, minloglevel=2)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "bare.model"))
    # <CLS> <SEP> <EOD> <MASK> then <PAD> <BOS> for the ids the model lacks; eos stays the model's
    assert (tok.eod, tok.pad, tok.bos, tok.eos, tok.vocab_size) == (402, 404, 405, 1, 406)
    tok.save_pretrained_files(str(tmp_path / "hf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (404, 405, 1, 406)
    assert hf.convert_tokens_to_ids("<EOD>") == 402


def test_hf_tokenizer_reads_a_bare_tokenizer_json_and_finds_its_eod(trained):
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(trained / "bpe" / "tokenizer.json"))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(trained / "bpe" / "vocab.json"),
                           merge_file=str(trained / "bpe" / "merges.txt"))
    assert tok.eod == gpt2.eod and tok.tokenize_batch([SAMPLE]) == [gpt2.tokenize(SAMPLE)]
    assert tok.detokenize(gpt2.tokenize(SAMPLE)) == SAMPLE


def test_null_tokenizer_parses_integers_and_reserves_the_last_id_for_eod(tmp_path):
    tok = build_tokenizer("NullTokenizer", vocab_size=99)  # upstream's: V + 1 tokens, end of document V
    assert tok.vocab_size == 100 and tok.eod == 99
    assert tok.tokenize_batch(["1 2  3\n4", ""]) == [[1, 2, 3, 4], []]
    assert tok.detokenize([5, 6]) == "5 6"
    with pytest.raises(ValueError, match="id 100 outside"):
        tok.tokenize("1 100")
    with pytest.raises(ValueError, match="whitespace-separated integers"):
        tok.tokenize("1 two")
    with pytest.raises(TokenizerError, match="no vocabulary files"):
        tok.save_pretrained_files(str(tmp_path))
    config_tok = build_tokenizer_from_config(DataConfig(tokenizer_type="NullTokenizer", vocab_size=512))
    assert config_tok.vocab_size == 513 and config_tok.eod == 512
    older = NullTokenizer(512, eod_in_vocab_size=True)  # this framework's older convention, for its checkpoints
    assert older.vocab_size == 512 and older.eod == 511


def test_missing_or_wrong_inputs_name_the_flag_and_path(trained, tmp_path):
    cases = [
        (dict(tokenizer_type="GPT2BPETokenizer"), "needs --vocab-file"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "v.json"), merge_file="m"),
         r"--vocab-file .*v\.json: file not found"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=str(trained / "bpe" / "vocab.json"),
              merge_file=str(tmp_path / "m.txt")), r"--merge-file .*m\.txt: file not found"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model")),
         r"--tokenizer-model .*x\.model: file not found"),
        (dict(tokenizer_type="Llama2Tokenizer", tokenizer_model=str(trained / "bpe" / "vocab.json")),
         r"--tokenizer-model .*vocab\.json: not a SentencePiece model"),
        (dict(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path / "nowhere")),
         r"--tokenizer-model .*nowhere: no such file or directory"),
        (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
        (dict(tokenizer_type="BertWordPieceLowerCase"), "is not supported"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TokenizerError, match=message):
            build_tokenizer(**kwargs)
    with pytest.raises(TokenizerError, match="no --tokenizer-type"):
        build_tokenizer_from_config(DataConfig())
