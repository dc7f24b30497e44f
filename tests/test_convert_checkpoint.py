"""Converters end to end: checkpoints trained at tp=2 × pp=2 (Llama with GQA, GPT-2) and tp=2 × dp=2 ZeRO-3
exported to Hugging Face give the engine's logits; HF → ours → HF is bit-identical; a run resumes on other layouts.

One 4-rank launch trains every case (tests/convert_ranks.py); the checks then run in this process.
"""

import json
import os
import shutil
import sys

import pytest
import torch

import convert_ranks as cr
from multirank import run_ranks

from megatron.checkpoint.ds_checkpoint import DeepSpeedCheckpoint
from megatron.convert.ds_writer import write_checkpoint
from megatron.checkpoint.hf import HFModelSource
from megatron.convert.hf_io import export_to_hf
from megatron.checkpoint.layout import ConversionError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

LLAMA_TP2_PP2 = cr.LLAMA_FLAGS + cr.COMMON + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
GPT_TP2_PP2 = cr.GPT_FLAGS + cr.COMMON + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
GPT_TP2_ZERO3 = cr.GPT_FLAGS + cr.COMMON + ["--tensor-model-parallel-size", "2", "--zero-stage", "3"]
LLAMA_TP2_ZERO2 = cr.LLAMA_FLAGS + cr.COMMON + ["--tensor-model-parallel-size", "2", "--zero-stage", "2"]
LLAMA_DP4_ZERO3 = cr.LLAMA_FLAGS + cr.COMMON + ["--zero-stage", "3", "--micro-batch-size", "1"]
SAVE_AT, STEPS = 3, 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    jobs = [("train_save_continue", LLAMA_TP2_PP2, str(root / "llama"), SAVE_AT, STEPS),
            ("train_save", GPT_TP2_PP2, str(root / "gpt"), SAVE_AT),
            ("train_save", GPT_TP2_ZERO3, str(root / "gpt_z3"), SAVE_AT),
            ("resume_other_layout", LLAMA_TP2_ZERO2, str(root / "llama"), STEPS),
            ("resume_other_layout", LLAMA_DP4_ZERO3, str(root / "llama"), STEPS),
            # a ZeRO-sharded source: optimizer state read from ZeRO-2 shards, resumed at tp2 × pp2
            ("train_save", LLAMA_TP2_ZERO2, str(root / "llama_z2"), SAVE_AT),
            ("resume_other_layout", LLAMA_TP2_PP2, str(root / "llama_z2"), STEPS)]
    results = run_ranks(4, cr.run_sequence, jobs, timeout=400)
    return root, results


def full_logits(results, job, ranks):
    """Concatenate the vocab shards returned by `ranks` (tp order) for one job."""
    return torch.cat([results[r][job]["logits"] for r in ranks], dim=-1)[..., :100]


def hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(cr.PROBE_TOKENS).logits


@pytest.mark.parametrize("job,name,ranks,arch", [(0, "llama", (2, 3), "LlamaForCausalLM"),
                                                 (1, "gpt", (2, 3), "GPT2LMHeadModel"),
                                                 (2, "gpt_z3", (0, 1), "GPT2LMHeadModel")])
def test_export_to_hf_gives_the_engines_logits(trained, tmp_path, job, name, ranks, arch):
    root, results = trained
    reference = full_logits(results, job, ranks)
    summary = export_to_hf(DeepSpeedCheckpoint(str(root / name)), str(tmp_path / "hf"), max_shard_bytes=40_000,
                           progress=False)
    assert summary["architecture"] == arch
    assert len(summary["weights"]) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 100  # padding removed
    assert (hf_logits(str(tmp_path / "hf")) - reference).abs().max().item() < 1e-4


def test_hf_to_ours_to_hf_is_bit_identical_and_relayout_keeps_logits(trained, tmp_path):
    from safetensors.torch import load_file

    root, results = trained
    reference = full_logits(results, 0, (2, 3))
    export_to_hf(DeepSpeedCheckpoint(str(root / "llama")), str(tmp_path / "hf1"), progress=False)
    write_checkpoint(HFModelSource(str(tmp_path / "hf1")), str(tmp_path / "ours_tp2pp2"), tp=2, pp=2, progress=False)
    export_to_hf(DeepSpeedCheckpoint(str(tmp_path / "ours_tp2pp2")), str(tmp_path / "hf2"), progress=False)
    first, second = load_file(str(tmp_path / "hf1" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (json.loads((tmp_path / "hf1" / "config.json").read_text())
            == json.loads((tmp_path / "hf2" / "config.json").read_text()))
    # ours (tp=2, pp=2) -> HF -> ours (tp=1, pp=1): the same logits from our own model
    write_checkpoint(HFModelSource(str(tmp_path / "hf1")), str(tmp_path / "ours_tp1"), tp=1, pp=1, progress=False)
    from generate import load_our_model

    model, config, _ = load_our_model(str(tmp_path / "ours_tp1"))
    with torch.no_grad():
        ours = model(cr.PROBE_TOKENS)[..., :100]
    assert (ours - reference).abs().max().item() < 1e-5


def test_zero_to_fp32_consolidates_masters_with_model_names(trained, tmp_path):
    from convert_checkpoint import zero_to_fp32
    from safetensors.torch import load_file

    root, _ = trained
    out = str(tmp_path / "fp32.safetensors")
    count = zero_to_fp32(str(root / "gpt_z3"), out)
    state = load_file(out)
    ckpt = DeepSpeedCheckpoint(str(root / "gpt_z3"))
    assert count == len(state) and ckpt.zero_stage == 3 and ckpt.tp == 2 and ckpt.dp == 2
    assert state["embedding.word_embeddings.weight"].shape == (100, 48) and state["layers.0.attention.qkv.weight"].dtype == torch.float32
    exported = ckpt.state_dict()
    assert all(torch.equal(state[k], exported[k].float()) for k in exported)


def test_resume_on_another_layout_continues_the_loss(trained):
    _, results = trained
    uninterrupted = results[0][0]["losses"]
    # tp2 pp2 ZeRO-0 -> tp2 dp2 ZeRO-2, -> tp1 dp4 ZeRO-3; tp2 dp2 ZeRO-2 -> tp2 pp2 ZeRO-0
    for job in (3, 4, 6):
        resumed = results[0][job]
        assert resumed["iteration"] == SAVE_AT and resumed["consumed_samples"] == SAVE_AT * 4
        assert resumed["losses"] == pytest.approx(uninterrupted[SAVE_AT:], abs=1e-5)
    assert uninterrupted[-1] != pytest.approx(uninterrupted[0], abs=1e-3)  # training moved the loss


def test_mismatched_inputs_get_clear_errors(trained, tmp_path):
    root, _ = trained
    with pytest.raises(ConversionError, match="cannot be exported as LlamaForCausalLM.*RMSNorm"):
        export_to_hf(DeepSpeedCheckpoint(str(root / "gpt")), str(tmp_path / "x"), architecture="llama", progress=False)
    with pytest.raises(ConversionError, match="GPT2LMHeadModel.*untied"):
        export_to_hf(DeepSpeedCheckpoint(str(root / "llama")), str(tmp_path / "y"), architecture="gpt2", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(root / "llama" / f"global_step{SAVE_AT}", broken)
    os.remove(broken / "layer_02-model_01-model_states.pt")
    with pytest.raises(ConversionError, match="layer_02-model_01"):
        DeepSpeedCheckpoint(str(broken))
    os.remove(broken / "mp_rank_03_model_states.pt")
    with pytest.raises(ConversionError, match=r"model-parallel ranks \[3\] are missing"):
        DeepSpeedCheckpoint(str(broken))
    with pytest.raises(ConversionError, match="vocabulary"):  # a checkpoint read with another tokenizer's size
        DeepSpeedCheckpoint(str(root / "gpt"), vocab_size=5000).state_dict()


def _first_loss(argv, tmp_path, name):
    """Run pretrain_gpt.py on one rank for one iteration; (exit code, output, the logged lm loss or None)."""
    import re
    import subprocess

    from multirank import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    workdir = tmp_path / f"run_{name}"
    workdir.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(root, "pretrain_gpt.py"), *argv, "--train-iters", "1",
                           "--lr-warmup-iters", "0",
                           "--log-interval", "1", "--eval-iters", "0"],
                          capture_output=True, text=True, cwd=str(workdir), env=env, timeout=300)
    out = proc.stdout + proc.stderr
    found = re.search(r"lm loss[:=] *([0-9.E+-]+)", out)
    return proc.returncode, out, float(found.group(1)) if found else None


def test_a_hugging_face_folder_loads_as_weights_with_finetune(trained, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root, _ = trained
    hf = tmp_path / "hf"
    export_to_hf(DeepSpeedCheckpoint(str(root / "llama")), str(hf), progress=False)
    flags = cr.LLAMA_FLAGS + cr.COMMON
    runs = {"hf": flags + ["--load", str(hf), "--finetune"], "ours": flags + ["--load", str(root / "llama"),
                                                                                "--finetune"],
            "scratch": flags, "refused": flags + ["--load", str(hf)]}
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:  # four independent one-rank runs, side by side
        done = dict(zip(runs, pool.map(lambda name: _first_loss(runs[name], tmp_path, name), runs)))
    code, out, from_hf = done["hf"]
    assert code == 0, out
    code, out, from_ours = done["ours"]
    assert code == 0, out
    assert from_hf is not None and abs(from_hf - from_ours) < 1e-5  # the same weights, the same first batch
    code, out, from_scratch = done["scratch"]
    assert code == 0 and abs(from_scratch - from_hf) > 1e-3, out  # and they are not the seed's initial weights
    code, out, _ = done["refused"]
    assert code == 2 and "Hugging Face folder" in out and "--finetune" in out and "Traceback" not in out
