"""tools/generate.py: top-k/top-p filtering, and greedy text from our checkpoint equals greedy text from its HF export."""

import os
import sys

import torch

from megatron.config.model import TransformerConfig
from megatron.convert.ds_writer import write_checkpoint
from megatron.convert.hf_io import export_to_hf
from megatron.checkpoint.layout import StateDictSource
from megatron.model import GPTModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import generate  # noqa: E402

CONFIG = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=100,
                           make_vocab_size_divisible_by=16, attention_dropout=0.0, hidden_dropout=0.0)


def test_filter_logits_keeps_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = generate.filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(top2).tolist() == [[True, True, False, False]]
    nucleus = generate.filter_logits(logits, 1.0, 0, 0.7)  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False]]
    assert torch.isfinite(generate.filter_logits(logits, 1.0, 0, 0.4)).sum() == 1  # the top token always stays


def _word_level_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(100)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="99").save_pretrained(directory)


def test_greedy_generation_from_our_checkpoint_matches_its_hf_export(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPTModel(CONFIG, seed=3)
    tokenizer_args = {"tokenizer_type": "NullTokenizer", "vocab_size": 100}
    write_checkpoint(StateDictSource(model.state_dict(), CONFIG, tokenizer_args=tokenizer_args), str(tmp_path / "ckpt"),
                     tp=2, pp=1, progress=False)
    assert generate.main(["--load", str(tmp_path / "ckpt"), "--prompt", "5 17 42", "--greedy",
                          "--max-new-tokens", "6"]) == 0
    ours = capsys.readouterr().out.strip().splitlines()[-1].split()
    with torch.no_grad():  # the same greedy continuation computed directly
        ids = [5, 17, 42]
        for _ in range(6):
            ids.append(int(model.eval()(torch.tensor([ids]))[0, -1, :100].argmax()))
            if ids[-1] == 99:
                break
    assert [int(t) for t in ours] == ids
    export_to_hf(StateDictSource(model.state_dict(), CONFIG), str(tmp_path / "hf"), progress=False)
    _word_level_tokenizer(str(tmp_path / "hf"))
    assert generate.main(["--hf", str(tmp_path / "hf"), "--prompt", "5 17 42", "--greedy", "--max-new-tokens", "6"]) == 0
    theirs = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert theirs == ours


def test_sampling_is_reproducible_from_the_seed_and_top_k_with_top_p_is_refused(tmp_path, capsys):
    model = GPTModel(CONFIG, seed=3)
    write_checkpoint(StateDictSource(model.state_dict(), CONFIG, tokenizer_args={"tokenizer_type": "NullTokenizer",
                                                                                "vocab_size": 100}),
                     str(tmp_path / "ckpt"), progress=False)

    def run(seed):
        assert generate.main(["--load", str(tmp_path / "ckpt"), "--prompt", "5 17 42", "--prompt", "8",
                              "--max-new-tokens", "8", "--temperature", "1.5", "--top-k", "50", "--ignore-eos",
                              "--seed", str(seed)]) == 0
        return capsys.readouterr().out.strip().splitlines()

    first = run(1)
    assert first == run(1) and len(first[1].split()) == 11 and len(first[3].split()) == 9
    assert run(2) != first
    assert generate.main(["--load", str(tmp_path / "ckpt"), "--prompt", "5", "--top-k", "5", "--top-p", "0.5"]) == 2
    assert "--top-k and --top-p cannot both be set" in capsys.readouterr().err


def test_generate_under_torchrun_at_pp2_prints_what_one_process_prints(tmp_path, capsys):
    import subprocess
    from pathlib import Path

    model = GPTModel(CONFIG, seed=3)
    write_checkpoint(StateDictSource(model.state_dict(), CONFIG, tokenizer_args={"tokenizer_type": "NullTokenizer",
                                                                                "vocab_size": 100}),
                     str(tmp_path / "ckpt"), tp=2, progress=False)
    flags = ["--load", str(tmp_path / "ckpt"), "--prompt", "5 17 42", "--prompt", "8 9", "--greedy",
             "--max-new-tokens", "6", "--ignore-eos"]
    assert generate.main(flags) == 0
    alone = capsys.readouterr().out
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]  # its own port
    proc = subprocess.run(torchrun + ["tools/generate.py", *flags, "--pp", "2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == alone  # rank 0 prints, once
