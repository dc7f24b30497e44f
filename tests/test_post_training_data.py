"""Post-training data: tools/preprocess_data.py --task sft|dpo and megatron/data/post_training.py.

The masks are checked against TRL 1.16's own tokenization of the same examples (trl.data_utils' _tokenize and
common_prefix_length, the steps of SFTTrainer's / DPOTrainer's dataset preparation, DPO's collator), the
packing against the model's document mask, and the order against a resumed iterator."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.config import DataConfig
from megatron.data.data_iterator import build_data_iterator
from megatron.data.indexed_dataset import IndexedDataset, write_dataset
from megatron.data.post_training import (
    PostTrainingDataError, _pack_best_fit, build_post_training_datasets, collate, open_post_training_data,
)
from megatron.data.post_training_format import common_prefix_length
from megatron.model.attention import document_attention_mask
from tools import preprocess_data, preprocess_post_training
from tools.train_tokenizer import train_bpe

# ChatML, with TRL's {% generation %} markers around what an assistant turn trains on
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}"
                 "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = "The quick brown fox jumps over the lazy dog. What is two plus two? It is four. Name a colour: red.\n"



def _tiny_llama(seq: int, vocab: int):
    """A 2-layer Llama-style GPTModel (one rank, eval mode) for checking the data's log-probabilities."""
    from megatron.config.arguments import parse_args
    from megatron.distributed.parallel_state import ParallelState
    from megatron.model import GPTModel
    run = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                      "--num-key-value-heads", "2", "--ffn-hidden-size", "64", "--seq-length", str(seq),
                      "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings",
                      "--hidden-dropout", "0", "--attention-dropout", "0", "--mock-data", "--vocab-size",
                      str(vocab), "--train-iters", "1"])
    return GPTModel(run.model, ParallelState.single(), seed=7).eval()

def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


SFT_EXAMPLES = [
    {"messages": [{"role": "system", "content": "Be brief."}, _user("What is two plus two?"), _assistant("It is four."),
                  _user("And the fox?"), _assistant("The quick brown fox.")]},
    {"prompt": "What is two plus two? ", "response": "It is four."},
    {"messages": [_user("Name a colour:"), _assistant("red")]},
    {"prompt": "The lazy", "completion": " dog jumps."},  # TRL's key; "dog" may merge across the boundary
    {"prompt": [_user("What?")], "response": [_assistant("The dog.")]},
]
DPO_EXAMPLES = [
    {"prompt": "What is two plus two? ", "chosen": "It is four.", "rejected": "It is red."},
    {"prompt": [_user("Name a colour:")], "chosen": [_assistant("red")], "rejected": [_assistant("The fox.")]},
    {"prompt": "The quick brown", "chosen": " fox jumps.", "rejected": " dog."},
    {"prompt": [{"role": "system", "content": "Be brief."}, _user("What is two plus two?")],
     "chosen": [_assistant("four")], "rejected": [_assistant("It is four, the quick brown fox says.")]},
]
IMPLICIT_PROMPT = [  # TRL's implicit-prompt forms: the prompt is what chosen and rejected share
    {"chosen": "What is two plus two? It is four.", "rejected": "What is two plus two? It is red."},
    {"chosen": [_user("Name a colour:"), _assistant("red")], "rejected": [_user("Name a colour:"), _assistant("dog")]},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(chat flags, plain flags, the transformers tokenizer): a tiny BPE as a Hugging Face directory with a
    ChatML template and its two special tokens, and the same BPE as GPT2BPETokenizer (no chat template)."""
    from transformers import AutoTokenizer

    from megatron.data.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    train_bpe([CORPUS * 30], 400, str(root / "bpe"))
    plain = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(root / "bpe" / "vocab.json"),
             "--merge-file", str(root / "bpe" / "merges.txt")]
    build_tokenizer("GPT2BPETokenizer", vocab_file=plain[3], merge_file=plain[5]).save_pretrained_files(
        str(root / "chat"))
    hf = AutoTokenizer.from_pretrained(str(root / "chat"), local_files_only=True)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(root / "chat"))
    hf = AutoTokenizer.from_pretrained(str(root / "chat"), local_files_only=True)
    return ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(root / "chat")], plain, hf


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _preprocess(tmp_path, task, records, flags, name="set", extra=()):
    source = _write_jsonl(tmp_path / f"{name}.jsonl", records)
    prefix = tmp_path / "out" / name
    rc = preprocess_data.main(["--task", task, "--input", str(source), "--output-prefix", str(prefix), "--quiet",
                               *extra] + flags)
    return rc, f"{prefix}_text_document"


def _sequences(prefix):
    tokens, mask = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    return [(tokens.get(i).tolist(), mask.get(i).tolist()) for i in range(len(tokens))]


# ------------------------------------------------------------------------------------------ TRL's tokenization
def _trl_sft(hf, example):
    """(input_ids, mask) as TRL's SFTTrainer prepares the example (prompt-completion: completion_mask; messages:
    assistant_only_loss's assistant_masks), after its add_eos step for plain text."""
    from trl.data_utils import _tokenize
    from trl.data_utils import common_prefix_length as trl_common_prefix_length

    if "messages" in example:
        out = _tokenize(hf, example["messages"], return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    prompt, completion = example["prompt"], example.get("response", example.get("completion"))
    if isinstance(prompt, list):
        prompt_ids = _tokenize(hf, prompt, add_generation_prompt=True)["input_ids"]
        full = _tokenize(hf, prompt + completion)["input_ids"]
    else:
        completion = completion if completion.endswith(hf.eos_token) else completion + hf.eos_token
        prompt_ids = _tokenize(hf, prompt)["input_ids"]
        full = _tokenize(hf, prompt + completion)["input_ids"]
    start = trl_common_prefix_length(prompt_ids, full)
    return list(full), [0] * start + [1] * (len(full) - start)


def _trl_dpo_batch(hf, examples):
    """TRL's DPOTrainer preparation of the examples (add_eos for plain text, tokenize_fn's common-prefix
    boundary) fed to its DataCollatorForPreference: input_ids, attention_mask, completion_mask [2n, len]."""
    from trl.data_utils import _tokenize, is_conversational
    from trl.data_utils import common_prefix_length as trl_common_prefix_length
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prepared = []
    for example in examples:
        example = dict(example)
        if is_conversational(example):
            prompt_ids = _tokenize(hf, example["prompt"], add_generation_prompt=True)["input_ids"]
            chosen = _tokenize(hf, example["prompt"] + example["chosen"])["input_ids"]
            rejected = _tokenize(hf, example["prompt"] + example["rejected"])["input_ids"]
        else:
            for key in ("chosen", "rejected"):
                if not example[key].endswith(hf.eos_token):
                    example[key] += hf.eos_token
            prompt_ids = _tokenize(hf, example["prompt"])["input_ids"]
            chosen = _tokenize(hf, example["prompt"] + example["chosen"])["input_ids"]
            rejected = _tokenize(hf, example["prompt"] + example["rejected"])["input_ids"]
        start = min(trl_common_prefix_length(prompt_ids, chosen), trl_common_prefix_length(prompt_ids, rejected))
        prepared.append({"prompt_ids": prompt_ids[:start], "chosen_ids": chosen[start:],
                         "rejected_ids": rejected[start:]})
    return DataCollatorForPreference(pad_token_id=hf.eos_token_id)(prepared)


# ------------------------------------------------------------------------------------------------- formats
def test_sft_sequences_and_masks_equal_trls_for_every_form(tmp_path, tokenizers):
    chat, _, hf = tokenizers
    rc, prefix = _preprocess(tmp_path, "sft", SFT_EXAMPLES, chat)
    assert rc == 0
    got = _sequences(prefix)
    assert len(got) == len(SFT_EXAMPLES)
    for example, (ids, mask) in zip(SFT_EXAMPLES, got):
        assert (ids, mask) == _trl_sft(hf, example), example
    # multi-turn: both assistant turns carry loss, the system and user turns none
    ids, mask = got[0]
    trained = hf.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "It is four.<|im_end|>\nThe quick brown fox.<|im_end|>\n"
    # plain text: the EOD closes the response and carries loss
    ids, mask = got[1]
    assert ids[-1] == hf.eos_token_id and mask[-1] == 1 and hf.decode(ids[mask.index(1):-1]).strip() == "It is four."
    metadata = open_post_training_data(prefix).metadata
    assert metadata["task"] == "sft" and metadata["examples"] == 5 and metadata["chat_template"] is True
    assert metadata["forms"] == {"chat": 1, "messages": 2, "text": 2}
    assert metadata["tokenizer"]["tokenizer_type"] == "HFTokenizer" and metadata["source"][0]["lines"] == 5


def test_dpo_pairs_equal_trls_collated_batch(tmp_path, tokenizers):
    chat, _, hf = tokenizers
    from trl.data_utils import extract_prompt

    rc, prefix = _preprocess(tmp_path, "dpo", DPO_EXAMPLES + IMPLICIT_PROMPT, chat)
    assert rc == 0
    (train, _, _), report = build_post_training_datasets(prefix, "dpo", 64, pack=False, overlong="truncate",
                                                         split="1", seed=3, eod=hf.eos_token_id, pad=hf.eos_token_id)
    assert report.splits["train"].truncated == 0 and len(train) == 6
    items = sorted((train[i] for i in range(len(train))), key=lambda item: item["pair_id"])
    ours = collate(items)
    reference = _trl_dpo_batch(hf, DPO_EXAMPLES + [extract_prompt(example) for example in IMPLICIT_PROMPT])
    n = len(DPO_EXAMPLES) + len(IMPLICIT_PROMPT)
    assert ours["tokens"].shape == (2 * n, 65) and ours["loss_mask"].shape == (2 * n, 64)
    assert ours["pair_ids"].tolist() == list(range(n))
    for row in range(2 * n):  # rows 0..n-1 chosen, n..2n-1 rejected, in TRL's order too
        length = int(reference["attention_mask"][row].sum())
        assert ours["tokens"][row, :length].tolist() == reference["input_ids"][row, :length].tolist(), row
        # our loss mask is the labels' (tokens[1:]); TRL's completion mask is the tokens'
        assert ours["loss_mask"][row, :length - 1].tolist() == reference["completion_mask"][row, 1:length].tolist()
        assert not ours["loss_mask"][row, length - 1:].any()


def test_messages_are_refused_by_name_without_a_chat_template(tmp_path, tokenizers, capsys):
    _, plain, _ = tokenizers
    rc, prefix = _preprocess(tmp_path, "sft", SFT_EXAMPLES[:1], plain)
    assert rc == 2
    err = capsys.readouterr().err
    assert "set.jsonl:1" in err and "GPT2BPETokenizer has no chat template" in err and "HFTokenizer" in err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    # a bare tokenizer.json carries no template either; plain prompt/response lines need none
    bare = ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(Path(plain[3]).parent / "tokenizer.json")]
    rc, _ = _preprocess(tmp_path, "sft", SFT_EXAMPLES[:1], bare, name="bare")
    assert rc == 2 and "tokenizer.json: this Hugging Face tokenizer has no chat template" in capsys.readouterr().err
    rc, prefix = _preprocess(tmp_path, "sft", [SFT_EXAMPLES[1]], plain, name="plain")
    assert rc == 0 and open_post_training_data(prefix).metadata["chat_template"] is False


def test_every_bad_line_is_listed_with_its_number_before_anything_is_written(tmp_path, tokenizers, capsys):
    chat, _, _ = tokenizers
    good = {"prompt": "What is two plus two? ", "response": "It is four."}
    bad = [
        "not json",
        {"prompt": "x"},  # missing response
        {"messages": [{"role": "robot", "content": "x"}, _assistant("y")]},
        {"messages": [_user("hi"), _assistant("   ")]},  # empty response
        {"messages": [_user("hi"), _assistant("yo"), _user("and?")]},  # last message not the assistant's
        {"messages": [_user("hi"), {"role": "system", "content": "late"}, _assistant("yo")]},
        ["a", "list"],
        {"prompt": [_user("hi")], "response": "a string"},  # forms mixed
    ]
    rc, _ = _preprocess(tmp_path, "sft", [good, *bad, good] + ["{"] * 25, chat)
    assert rc == 2
    err = capsys.readouterr().err
    assert "33 bad line(s)" in err and "nothing was written" in err and "... and 13 more" in err
    for line in range(2, 10):
        assert f"set.jsonl:{line}: " in err, line
    for words in ("invalid JSON", 'missing key "response"', "role 'robot'", "empty assistant response",
                  "the last message is a user message", "a system message may only come first", "not an object",
                  "not a mix"):
        assert words in err, words
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")
    dpo_bad = [{"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": "", "rejected": "r"},
               {"chosen": "same", "rejected": "same"}, {"chosen": "yes", "rejected": "no"},
               {"prompt": [_user("q")], "chosen": [_user("c")], "rejected": [_assistant("r")]},
               {"prompt": [_user("q"), _assistant("a")], "chosen": [_assistant("c")], "rejected": [_assistant("r")]}]
    rc, _ = _preprocess(tmp_path, "dpo", dpo_bad, chat, name="dpo")
    err = capsys.readouterr().err
    assert rc == 2 and "6 bad line(s)" in err
    for words in ("missing key 'rejected'", "'chosen' is empty", "are identical", "share no beginning",
                  "chosen[0]: role 'user' in a response",
                  "'prompt' ends with an assistant message"):
        assert words in err, words
    # --skip-bad-lines: the good lines are written, the bad ones counted and listed
    rc, prefix = _preprocess(tmp_path, "sft", [good, *bad, good], chat, name="skip", extra=["--skip-bad-lines"])
    assert rc == 0 and len(_sequences(prefix)) == 2
    assert open_post_training_data(prefix).metadata["skipped_bad_lines"] == len(bad)
    assert "skipped 8 bad line(s)" in capsys.readouterr().out


def test_several_inputs_plain_and_gzipped_keep_their_order_and_line_numbers(tmp_path, tokenizers, capsys):
    import gzip

    chat, _, _ = tokenizers
    _write_jsonl(tmp_path / "a.jsonl", SFT_EXAMPLES[:2])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in SFT_EXAMPLES[2:]) + "\n")
    rc = preprocess_data.main(["--task", "sft", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"),
                               "--output-prefix", str(tmp_path / "out" / "ab"), "--quiet", "--workers", "2"] + chat)
    assert rc == 0
    rc, single = _preprocess(tmp_path, "sft", SFT_EXAMPLES, chat, name="single")
    assert _sequences(str(tmp_path / "out" / "ab_text_document")) == _sequences(single)
    metadata = open_post_training_data(str(tmp_path / "out" / "ab")).metadata
    assert [(os.path.basename(s["path"]), s["lines"]) for s in metadata["source"]] == [("a.jsonl", 2),
                                                                                       ("b.jsonl.gz", 3)]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:  # blank lines count in the numbering
        f.write(json.dumps(SFT_EXAMPLES[1]) + "\n\n\n" + json.dumps({"prompt": 3, "response": "x"}) + "\n")
    rc = preprocess_data.main(["--task", "sft", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl.gz"),
                               "--output-prefix", str(tmp_path / "out" / "ac"), "--quiet"] + chat)
    err = capsys.readouterr().err
    assert rc == 2 and "c.jsonl.gz:4: 'prompt' holds int, not a string" in err and "1 bad line(s)" in err


def test_refused_flags_with_a_post_training_task(tmp_path, tokenizers, capsys):
    chat, _, _ = tokenizers
    for extra in (["--json-keys", "prompt"], ["--append-eod"], ["--partitions", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            _preprocess(tmp_path, "sft", SFT_EXAMPLES, chat, extra=extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"{extra[0]} with --task sft" in err and "leave it out" in err


def test_parallel_preprocessing_equals_serial_byte_for_byte(tmp_path, tokenizers, monkeypatch):
    chat, _, _ = tokenizers
    records = (SFT_EXAMPLES * 30)
    outputs = []
    for name, extra in (("serial", ["--workers", "1"]), ("parallel", ["--workers", "3", "--block-mb", "0.0005"])):
        rc, prefix = _preprocess(tmp_path, "sft", records, chat, name=name, extra=extra)
        assert rc == 0
        outputs.append(prefix)
    # and the path that encodes again while writing, when the checked blocks do not fit in memory
    monkeypatch.setattr(preprocess_post_training, "KEEP_IN_MEMORY_BYTES", 0)
    rc, prefix = _preprocess(tmp_path, "sft", records, chat, name="again",
                             extra=["--workers", "2", "--block-mb", "0.001"])
    assert rc == 0
    outputs.append(prefix)
    files = [[open(f"{prefix}{suffix}", "rb").read() for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx")]
             for prefix in outputs]
    assert files[0] == files[1] == files[2]
    metadata = [json.loads(open(f"{prefix}.post_training.json").read()) for prefix in outputs]
    for m in metadata:
        m.pop("source")
    assert metadata[0] == metadata[1] == metadata[2] and metadata[0]["examples"] == 150
    assert not [name for name in os.listdir(tmp_path / "out") if "tmp" in name]


# ------------------------------------------------------------------------------------------------- datasets
def _synthetic_set(tmp_path, task, lengths, prompt_lengths, name="syn"):
    """A set written directly: sequence i has tokens 100*i + 0..L-1 and loss on tokens >= its prompt length."""
    prefix = str(tmp_path / f"{name}_text_document")
    sequences = [np.arange(length, dtype=np.int64) + 100 * i for i, length in enumerate(lengths)]
    masks = [(np.arange(length) >= prompt).astype(np.uint8) for length, prompt in zip(lengths, prompt_lengths)]
    write_dataset(prefix, sequences, np.int32)
    write_dataset(prefix + "_loss_mask", masks, np.uint8)
    examples = len(lengths) // (2 if task == "dpo" else 1)
    with open(prefix + ".post_training.json", "w") as f:
        json.dump({"format": 1, "task": task, "examples": examples, "sequences": len(lengths),
                   "tokenizer": {"eod": 0}}, f)
    return prefix, sequences, masks


def test_packing_never_attends_across_examples_and_restarts_positions(tmp_path):
    lengths = [5, 3, 9, 2, 7, 4, 6, 1, 8, 3]
    prefix, sequences, masks = _synthetic_set(tmp_path, "sft", lengths, [2] * 10)
    seq = 11
    (train, _, _), report = build_post_training_datasets(prefix, "sft", seq, pack=True, overlong="truncate",
                                                         split="1", seed=5, eod=0, pad=-1)
    seen = []
    for sample in range(len(train)):
        item = train[sample]
        tokens, loss, documents, positions = (item[k] for k in ("tokens", "loss_mask", "document_ids", "position_ids"))
        assert tokens.shape == (seq + 1,) and loss.shape == documents.shape == positions.shape == (seq,)
        attention = document_attention_mask(torch.from_numpy(documents)[None])[0, 0]
        offset = 0
        for number in range(int(documents.max()) + 1):
            where = np.flatnonzero(documents == number)
            if tokens[offset] == -1:  # the padding's own document
                assert (tokens[offset:] == -1).all() and not loss[offset:].any()
                break
            example = int(tokens[offset]) // 100
            seen.append(example)
            length = lengths[example]
            assert tokens[offset:offset + length].tolist() == sequences[example].tolist()
            assert where.tolist() == list(range(offset, min(offset + length, seq)))
            assert positions[where].tolist() == list(range(len(where)))
            # labels inside the example carry its mask; the label crossing into the next example carries none
            assert loss[offset:offset + length - 1].tolist() == masks[example][1:].tolist()
            if offset + length - 1 < seq:
                assert loss[offset + length - 1] == 0
            # no query of this example attends to a key outside it
            assert not attention[where][:, np.setdiff1d(np.arange(seq), where)].any()
            offset += length
    assert sorted(seen) == list(range(10))  # each example in exactly one row of an epoch
    counts = report.splits["train"]
    assert counts.rows == len(train) < 10 and counts.tokens == sum(lengths)
    assert any("packed" in line for line in report.lines())


def test_a_packed_row_gives_each_example_the_logits_it_gets_alone(tmp_path):
    """Through the model: document ids and restarted positions make packing exact (Llama: RoPE, GQA)."""

    seq, vocab = 16, 64
    lengths = [5, 4, 6, 3, 7, 2, 5]
    rng = np.random.default_rng(3)
    sequences = [rng.integers(1, vocab, size=length) for length in lengths]
    prefix = str(tmp_path / "model_text_document")
    write_dataset(prefix, sequences, np.int32)
    write_dataset(prefix + "_loss_mask", [np.ones(length, np.uint8) for length in lengths], np.uint8)
    with open(prefix + ".post_training.json", "w") as f:
        json.dump({"format": 1, "task": "sft", "examples": 7, "sequences": 7, "tokenizer": {"eod": 0}}, f)
    (train, _, _), _ = build_post_training_datasets(prefix, "sft", seq, pack=True, overlong="truncate", split="1",
                                                    seed=0, eod=0, pad=0)
    model = _tiny_llama(seq, vocab)
    batch = collate([train[i] for i in range(len(train))])
    checked = 0
    with torch.no_grad():
        packed = model(batch["tokens"][:, :seq], position_ids=batch["position_ids"],
                       document_ids=batch["document_ids"])
        for row in range(len(train)):
            documents = batch["document_ids"][row]
            for number in documents.unique().tolist():
                where = (documents == number).nonzero().flatten()
                # an example ending on the row's last token (a label only) has one input position fewer
                example = next((i for i, s in enumerate(sequences) if len(s) - len(where) in (0, 1)
                                and batch["tokens"][row, where].tolist() == s[:len(where)].tolist()), None)
                if example is None:  # the padding
                    continue
                alone = model(torch.from_numpy(sequences[example][None]).long())
                torch.testing.assert_close(packed[row, where], alone[0, :len(where)], rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked == len(lengths)


def test_best_fit_packing_fills_rows_tighter_than_next_fit_and_places_every_example_once():
    bounds, positions = _pack_best_fit(np.array([6, 7, 5, 4]), 11)
    rows = [positions[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    assert rows == [[0, 2], [1, 3]]  # next fit would need 3 rows: [6], [7], [5, 4]
    lengths = np.random.default_rng(0).integers(1, 30, size=500)
    bounds, positions = _pack_best_fit(lengths, 32)
    assert sorted(positions.tolist()) == list(range(500))
    sums = [int(lengths[positions[a:b]].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(sums) <= 32 and len(sums) <= np.ceil(lengths.sum() / 32) * 1.1


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    # seq_length 6 -> rows of 7 tokens: lengths 7 fits, 8 and 12 are too long; the 12's response starts at
    # token 9, beyond the first 7, so truncating it leaves no response token and drops it anyway
    prefix, _, masks = _synthetic_set(tmp_path, "sft", [4, 7, 8, 12], [1, 2, 3, 9])
    (train, _, _), report = build_post_training_datasets(prefix, "sft", 6, pack=False, overlong="truncate",
                                                         split="1", seed=0, eod=0, pad=0)
    c = report.splits["train"]
    assert (c.examples, c.kept, c.truncated, c.dropped_overlong, c.dropped_no_response) == (4, 3, 1, 0, 1)
    truncated = next(train[i] for i in range(len(train)) if train[i]["tokens"][0] == 200)
    assert truncated["tokens"].tolist() == list(range(200, 207)) and truncated["loss_mask"].tolist() == \
        masks[2][1:7].astype(np.float32).tolist()
    (train, _, _), report = build_post_training_datasets(prefix, "sft", 6, pack=False, overlong="drop",
                                                         split="1", seed=0, eod=0, pad=0)
    c = report.splits["train"]
    assert (c.kept, c.truncated, c.dropped_overlong, c.dropped_no_response) == (2, 0, 2, 0) and len(train) == 2
    assert "2 dropped as too long" in "\n".join(report.lines())
    # DPO: a pair is too long when either sequence is; both are truncated together
    prefix, _, _ = _synthetic_set(tmp_path, "dpo", [4, 9, 5, 5], [1, 1, 2, 2], name="pairs")
    (train, _, _), report = build_post_training_datasets(prefix, "dpo", 6, pack=False, overlong="drop",
                                                         split="1", seed=0, eod=0, pad=0)
    assert report.splits["train"].dropped_overlong == 1 and len(train) == 1 and train[0]["pair_id"] == 1


def test_dpo_pair_layout(tmp_path):
    lengths = [3, 4, 5, 2, 4, 4, 6, 3, 2, 5]  # 5 pairs: (3, 4), (5, 2), ...
    prefix, sequences, masks = _synthetic_set(tmp_path, "dpo", lengths, [1] * 10)
    (train, _, _), _ = build_post_training_datasets(prefix, "dpo", 8, pack=False, overlong="truncate", split="1",
                                                    seed=1, eod=0, pad=0)
    batch = collate([train[i] for i in range(3)])
    pairs = batch["pair_ids"].tolist()
    assert batch["tokens"].shape == (6, 9) and batch["loss_mask"].shape == (6, 8) and len(set(pairs)) == 3
    for row, pair in enumerate(pairs):
        for half, column in ((0, 0), (3, 1)):  # chosen rows first, then the rejected rows in the same order
            sequence = 2 * pair + column
            length = lengths[sequence]
            assert batch["tokens"][half + row, :length].tolist() == sequences[sequence].tolist()
            assert batch["loss_mask"][half + row, :length - 1].tolist() == masks[sequence][1:].tolist()


def test_packed_dpo_keeps_each_pair_in_one_row_pair_and_gives_the_padded_log_probabilities(tmp_path):
    """--packing with --task dpo: every pair once in an epoch, its chosen sequence in a chosen row and its rejected
    one at the same document number of the matching rejected row; through the model (document mask, restarted
    positions), each pair's summed log-probabilities equal those of the padded layout within 1e-5."""
    import torch.nn.functional as F

    from megatron.post_training.losses import pair_logps

    seq, vocab = 16, 64
    rng = np.random.default_rng(5)
    lengths = [int(n) for n in rng.integers(3, 9, size=24)]  # 12 pairs
    sequences = [rng.integers(1, vocab, size=length) for length in lengths]
    prefix = str(tmp_path / "pairs_text_document")
    write_dataset(prefix, sequences, np.int32)
    write_dataset(prefix + "_loss_mask", [(np.arange(n) >= 2).astype(np.uint8) for n in lengths], np.uint8)
    with open(prefix + ".post_training.json", "w") as f:
        json.dump({"format": 1, "task": "dpo", "examples": 12, "sequences": 24, "tokenizer": {"eod": 0}}, f)
    build = lambda pack: build_post_training_datasets(prefix, "dpo", seq, pack=pack, overlong="truncate",  # noqa
                                                      split="1", seed=3, eod=0, pad=0)
    (packed, _, _), report = build(True)
    (padded, _, _), _ = build(False)
    assert len(packed) < len(padded) == 12 and report.splits["train"].rows == len(packed)
    batch = collate([packed[i] for i in range(len(packed))])
    n = len(packed)
    assert batch["document_ids"].shape == (2 * n, seq) and batch["pair_ids"].shape[0] == n
    seen = sorted(int(p) for p in batch["pair_ids"].flatten() if p >= 0)
    assert seen == list(range(12))  # each pair once, in one row pair
    for row in range(n):
        offsets = [0, 0]
        for d, pair in enumerate(batch["pair_ids"][row].tolist()):
            if pair < 0:
                continue
            for side in (0, 1):  # chosen row `row`, rejected row n + row: document d is this pair's
                sequence, r = 2 * pair + side, side * n + row
                where = (batch["document_ids"][r] == d).nonzero().flatten().tolist()
                assert where == list(range(offsets[side], min(offsets[side] + lengths[sequence], seq)))
                assert batch["tokens"][r, where].tolist() == sequences[sequence][:len(where)].tolist()
                assert batch["position_ids"][r, where].tolist() == list(range(len(where)))
                offsets[side] += lengths[sequence]
    model = _tiny_llama(seq, vocab)

    def logps_by_pair(batch, packed_layout):
        with torch.no_grad():
            logits = model(batch["tokens"][:, :seq], position_ids=batch.get("position_ids"),
                           document_ids=batch.get("document_ids"))
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
        chosen, rejected, tc, tr, pairs = pair_logps(nll, batch["loss_mask"], batch["pair_ids"],
                                                     batch["document_ids"] if packed_layout else None)
        return {int(p): (c, r, a, b) for p, c, r, a, b in zip(pairs.tolist(), chosen.tolist(), rejected.tolist(),
                                                              tc.tolist(), tr.tolist())}

    from_packed = logps_by_pair(batch, True)
    from_padded = logps_by_pair(collate([padded[i] for i in range(12)]), False)
    assert sorted(from_packed) == sorted(from_padded) == list(range(12))
    for pair, values in from_padded.items():
        assert values[2:] == from_packed[pair][2:]  # the response token counts
        assert values[0] < 0 and values[1] < 0
        np.testing.assert_allclose(from_packed[pair][:2], values[:2], rtol=1e-5, atol=1e-5)


def test_order_is_deterministic_per_seed_and_split_and_resumes_from_consumed_samples(tmp_path):
    prefix, _, _ = _synthetic_set(tmp_path, "sft", [3 + i % 5 for i in range(40)], [1] * 40)

    def build(seed, split="8,2,0", pack=False, num_samples=(100, 10, 0)):
        return build_post_training_datasets(prefix, "sft", 8, pack=pack, overlong="truncate", split=split,
                                            seed=seed, eod=0, pad=0, num_samples=num_samples)[0]

    def first_tokens(dataset):
        return [int(dataset[i]["tokens"][0]) for i in range(len(dataset))]

    train, valid, test = build(7)
    assert len(train) == 100 and len(valid) == 10 and test is None
    order = first_tokens(train)
    assert order == first_tokens(build(7)[0]) and order != first_tokens(build(8)[0])
    assert {t // 100 for t in order[:32]} == set(range(32))  # epoch 1: every train example (32 of 40) once
    assert order[32:64] != order[:32] and sorted(order[32:64]) == sorted(order[:32])  # epoch 2: a new order
    assert {t // 100 for t in first_tokens(valid)} <= set(range(32, 40))  # valid: the file's last examples
    assert first_tokens(build(7, num_samples=(60, 10, 0))[0]) == order[:60]  # a longer run extends the stream
    # resume: an iterator from consumed_samples continues the stream of an uninterrupted one, at any dp size
    full = [b["tokens"] for b in build_data_iterator(train, 2, 0, 1, 0, collate_fn=collate)]
    resumed = [torch.cat([b["tokens"] for b in batches]) for batches in zip(
        *(build_data_iterator(build(7)[0], 1, rank, 2, 40, collate_fn=collate) for rank in range(2)))]
    assert all(torch.equal(a, b) for a, b in zip(full[20:], resumed)) and len(resumed) == 30
    # DataLoader workers read the same micro-batches (the datasets pickle)
    loaded = [b["tokens"] for b in build_data_iterator(build(7)[0], 2, 0, 1, 90, num_workers=1,
                                                       multiprocessing_context="fork", collate_fn=collate)]
    assert len(loaded) == 5 and all(torch.equal(a, b) for a, b in zip(full[45:], loaded))
    packed = build(7, pack=True, num_samples=(50, 0, 0))[0]
    assert first_tokens(packed) == first_tokens(build(7, pack=True, num_samples=(50, 0, 0))[0])


def test_open_refuses_missing_inconsistent_or_mismatched_files(tmp_path):
    prefix, _, _ = _synthetic_set(tmp_path, "sft", [4, 5], [1, 1])
    assert open_post_training_data(str(tmp_path / "syn")).prefix == prefix  # the --output-prefix works too
    with pytest.raises(PostTrainingDataError, match="holds sft data, but the run is --task dpo"):
        build_post_training_datasets(prefix, "dpo", 8, pack=False, overlong="drop", split="1", seed=0, eod=0, pad=0)
    with pytest.raises(PostTrainingDataError, match="EOD is 0, but the run's is 7"):
        build_post_training_datasets(prefix, "sft", 8, pack=False, overlong="drop", split="1", seed=0, eod=7, pad=0)
    write_dataset(prefix + "_loss_mask", [np.ones(4, np.uint8), np.ones(6, np.uint8)], np.uint8)
    with pytest.raises(PostTrainingDataError, match="sequence sizes differ"):
        open_post_training_data(prefix)
    os.remove(prefix + ".post_training.json")
    with pytest.raises(PostTrainingDataError, match="not post-training data"):
        open_post_training_data(prefix)


def test_post_training_flags_reach_the_data_config():
    import argparse

    from megatron.config.data import (
        add_data_arguments, add_data_blend_arguments, add_post_training_data_arguments, data_from_args,
    )

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    add_data_blend_arguments(parser)
    add_post_training_data_arguments(parser)
    config = data_from_args(parser.parse_args(["--packing", "--overlong-examples", "drop"]))
    assert config.packing is True and config.overlong_examples == "drop"
    assert DataConfig().packing is False and DataConfig().overlong_examples == "truncate"
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
