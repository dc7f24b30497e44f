"""Checkpoints of argonne-lcf/Megatron-DeepSpeed (AuroraGPT) are read: a Llama-style (GQA, RoPE, SwiGLU, untied)
and a GPT-2-style model, each as a pipeline (tp=2 × pp=2) and a non-pipeline (tp=2) run, built from their
documented layout (tests/argonne_files.py names the source file of every naming fact). The reader recovers every
weight and Adam moment bit for bit, to-hf gives the logits of the same weights exported directly, and --load
trains on exactly as from the states the files were built from.
"""

import os
import sys

import numpy as np
import pytest
import torch

import argonne_files as af
import convert_ranks as cr
from multirank import run_ranks

from megatron.config.arguments import parse_args
from megatron.checkpoint.argonne import ArgonneCheckpoint, config_from_argonne_args, is_argonne_checkpoint
from megatron.convert.hf_io import export_to_hf
from megatron.data.indexed_dataset import write_dataset
from megatron.checkpoint.layout import ConversionError, StateDictSource, full_parameter_names

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

LLAMA_ARGV = cr.LLAMA_FLAGS + cr.COMMON + ["--tensor-model-parallel-size", "2", "--zero-stage", "1"]
GPT_ARGV = cr.GPT_FLAGS + cr.COMMON + ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]
CONFIGS = {"llama": parse_args(LLAMA_ARGV).model, "gpt": parse_args(GPT_ARGV).model}
# (config, pipeline, their checkpoint_version): GPT-2 also in Megatron's two legacy QKV orders
VARIANTS = {"llama_pipe": ("llama", True, 3.0), "llama_nopipe": ("llama", False, 3.0),
            "gpt_pipe": ("gpt", True, 0), "gpt_nopipe": ("gpt", False, 1.0)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("argonne")
    states = {name: af.random_state(config, seed) for seed, (name, config) in enumerate(CONFIGS.items())}
    for name, state in states.items():
        torch.save(state, root / f"{name}_truth.pt")
    for variant, (name, pipeline, version) in VARIANTS.items():
        af.write_argonne_checkpoint(states[name], CONFIGS[name], str(root / variant), tp=2, pp=2 if pipeline else 1,
                                    pipeline=pipeline, version=version)
    return root, states


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reader_recovers_config_weights_and_moments_bit_for_bit(built, variant):
    root, states = built
    name, _, _ = VARIANTS[variant]
    ckpt = ArgonneCheckpoint(str(root / variant))
    assert is_argonne_checkpoint(str(root / variant)) and ckpt.tag_dir.endswith("global_step3")
    # their loss spans the padded vocabulary: the reader says so (resume follows it unless told otherwise)
    assert ckpt.config.to_dict() == CONFIGS[name].replace(sequence_parallel=False, loss_over_padded_vocab=True).to_dict()
    for param in full_parameter_names(ckpt.config):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ckpt.full_optimizer_tensor(param, key), states[name][param][key]), (param, key)
    assert ckpt.optimizer_step() == 3 and ckpt.client_state["consumed_samples"] == 12 and ckpt.iteration == 3
    module = ArgonneCheckpoint(str(root / variant), weights="module").state_dict()  # the bf16 module weights
    assert all(torch.equal(module[p].float(), states[name][p]["fp32"].bfloat16().float()) for p in module)


def hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(cr.PROBE_TOKENS).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_hf_gives_the_logits_of_the_same_weights_exported_directly(built, tmp_path, variant):
    from convert_checkpoint import main

    root, states = built
    name, _, _ = VARIANTS[variant]
    assert main(["to-hf", "--load", str(root / variant), "--out", str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    direct = StateDictSource({p: s["fp32"] for p, s in states[name].items()}, CONFIGS[name])
    export_to_hf(direct, str(tmp_path / "direct"), save_tokenizer_files=False, progress=False)
    assert torch.equal(hf_logits(str(tmp_path / "hf")), hf_logits(str(tmp_path / "direct")))


def test_load_finds_the_tag_of_their_checkpoints_and_of_universal_folders(built, tmp_path):
    from megatron.checkpoint.resume import locate
    from megatron.errors import CheckpointError

    def where(load, *extra):
        run = parse_args(["--model-preset", "tiny", "--mock-data", "--vocab-size", "256", "--train-iters", "1",
                          "--load", load, *extra])
        return locate(run, log=lambda line: None, rank=0)

    root, _ = built
    assert where(str(root / "llama_pipe")) == ("argonne", str(root / "llama_pipe"), "global_step3")  # `latest`
    os.remove(root / "gpt_nopipe" / "latest")  # Megatron's tracker alone: "3" -> global_step3
    assert where(str(root / "gpt_nopipe")) == ("argonne", str(root / "gpt_nopipe"), "global_step3")
    assert where(str(tmp_path)) is None  # not theirs, and no checkpoint of ours yet: training starts from scratch
    with pytest.raises(CheckpointError, match="to-universal"):
        where(str(root / "llama_pipe"), "--universal-checkpoint")


def test_arguments_we_cannot_honour_are_named(built):
    ns = af.argonne_namespace(CONFIGS["llama"], 2, 2, apply_residual_connection_post_layernorm=True, use_mup=True,
                              num_experts=[4])
    with pytest.raises(ConversionError,
                       match=r"apply-residual-connection-post-layernorm True.*use-mup True.*num-experts \[4\]"):
        config_from_argonne_args(ns, "test")
    with pytest.raises(ConversionError, match="padded_vocab_size 256"):
        config_from_argonne_args(af.argonne_namespace(CONFIGS["gpt"], 2, 1, padded_vocab_size=256), "test")


@pytest.mark.parametrize("base,changes", [
    ("llama", dict(rotary_percent=0.5, fp32_residual_connection=True)),
    ("llama", dict(swiglu=False, squared_relu=True, init_method="xavier_uniform")),
    ("gpt", dict(apply_layernorm_1p=True, gelu_approximation="none")), ("gpt", dict(gelu_approximation="tanh"))])
def test_the_arguments_written_for_their_loader_describe_the_same_model(base, changes):
    """Our export's Namespace read back by our importer (their argument names, their precedence: --openai-gelu is
    checked before --swiglu there) is the model it was written for."""
    import dataclasses

    from megatron.convert.to_argonne import argonne_namespace

    config = dataclasses.replace(CONFIGS[base], **changes)
    ns = argonne_namespace(config, 2, 2, None)
    assert not (ns.openai_gelu and (ns.swiglu or ns.squared_relu))
    back = config_from_argonne_args(ns, "test", vocab_size=config.vocab_size)
    for name in ("apply_layernorm_1p", "squared_relu", "swiglu", "rotary_percent", "fp32_residual_connection",
                 "init_method", "normalization", "num_key_value_heads", "ffn_hidden_size"):
        assert getattr(back, name) == getattr(config, name), name
    if not (config.swiglu or config.squared_relu):
        assert back.gelu_approximation == config.gelu_approximation


def test_load_trains_on_like_the_states_it_was_built_from(built, tmp_path):
    root, _ = built
    # pretrain_gpt's own loop: --load finds global_step3 (not one of our global_step* tags) and trains one step on,
    # reading a --data-file-list in upstream's sample order, which an upstream checkpoint selects
    generator = torch.Generator().manual_seed(0)
    listing = tmp_path / "data_file_list.txt"
    for corpus in ("a", "b"):
        documents = [torch.randint(0, 100, (int(n),), generator=generator).numpy()
                     for n in torch.randint(1, 30, (20,), generator=generator)]
        write_dataset(str(tmp_path / corpus), documents, np.uint16)
    listing.write_text(f"1 {tmp_path / 'a'} a\n2 {tmp_path / 'b'} b\n")
    loop = [a for a in GPT_ARGV if a != "--mock-data"] + [
        "--data-file-list", str(listing), "--split", "98,2,0", "--load", str(root / "gpt_nopipe"),
        "--exit-interval", "4", "--num-workers", "0", "--eval-iters", "0"]
    # the truth trains with the loss over the real vocabulary (these files' padding rows are zero and, saved at
    # tp 2, do not fit tp 1's padding): --no-loss-over-padded-vocab, which drops them, resumes it
    masked = ["--no-loss-over-padded-vocab"]
    jobs = [("train_through_loop", loop + masked),
            ("resume_pair", LLAMA_ARGV + masked, str(root / "llama_pipe"), str(root / "llama_truth.pt"), 6),
            ("resume_pair", GPT_ARGV + masked, str(root / "gpt_nopipe"), str(root / "gpt_truth.pt"), 6)]
    results = run_ranks(2, cr.run_sequence, jobs, timeout=400)
    looped = results[0][0]
    assert looped["start"] == 3 and any(list(r[0]["losses"]) == [4] for r in results)
    assert looped["loaded"] == [f"loaded {root / 'gpt_nopipe' / 'global_step3'} at iteration 3, 12 consumed samples"]
    because = f"sample order: upstream's (its doc_idx, shuffle_idx and blend, recomputed) because --load {root}"
    assert len(looped["sample_order"]) == 2 and looped["sample_order"][0].startswith(because)
    # 8 iterations x 4 samples, weights 1 : 2: ceil(32 / 3 x 1.005) = 11 and ceil(64 / 3 x 1.005) = 22
    assert looped["sample_order"][1] == \
        "sample order: train: 33 samples in upstream's order from 2 corpora (a 11, b 22) of 2 files"
    for job in results[0][1:]:
        assert job["argonne"]["iteration"] == 3 and job["argonne"]["consumed_samples"] == 12
        assert job["argonne"]["losses"] == job["truth"]["losses"]
        assert len(job["argonne"]["losses"]) == 3 and all(l == l for l in job["argonne"]["losses"])


def test_format_marker_tells_ours_old_ours_and_megatrons_apart():
    import argparse

    from megatron.checkpoint.format import CHECKPOINT_FORMAT_KEY, checkpoint_format_marker, checkpoint_format_version
    from megatron.errors import CheckpointError

    assert checkpoint_format_version({CHECKPOINT_FORMAT_KEY: checkpoint_format_marker(), "args": {}}, "x") == 2
    assert checkpoint_format_version({"checkpoint_version": 1, "args": {"num_layers": 2}}, "x") == 1  # before it
    with pytest.raises(CheckpointError, match="newer"):
        checkpoint_format_version({CHECKPOINT_FORMAT_KEY: {"name": "megatron-ds-lite", "version": 99}}, "x")
    with pytest.raises(CheckpointError, match="argonne.py"):
        checkpoint_format_version({"checkpoint_version": 3.0, "args": argparse.Namespace(num_layers=2)}, "x")


def test_to_argonne_writes_the_files_their_layout_documents(built, tmp_path):
    """Ours -> their layout (weights only): the same layer files as the documented builder, read back exactly."""
    from convert_checkpoint import main

    root, states = built
    config = CONFIGS["llama"]
    truth = {p: s["fp32"] for p, s in states["llama"].items()}
    assert main(["to-argonne", "--load", str(root / "llama_pipe"), "--save", str(tmp_path / "back"), "--tp", "2",
                 "--pp", "2"]) == 0
    af.write_argonne_checkpoint(states["llama"], config, str(tmp_path / "documented"), tp=2, pp=2, pipeline=True,
                                optimizer=False, module_dtype=torch.float32)
    ours, documented = tmp_path / "back" / "global_step3", tmp_path / "documented" / "global_step3"
    layer_files = sorted(n for n in os.listdir(documented) if n.startswith("layer_"))
    assert layer_files == sorted(n for n in os.listdir(ours) if n.startswith("layer_"))
    for name in layer_files:
        a, b = torch.load(ours / name), torch.load(documented / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    back = ArgonneCheckpoint(str(tmp_path / "back"))
    assert back.version == 3.0 and back.config.to_dict() == config.replace(loss_over_padded_vocab=True).to_dict()
    assert all(torch.equal(t, truth[n]) for n, t in back.state_dict().items())


def test_their_lr_schedule_reads_as_ours():
    """Their OptimizerParamScheduler state (lengths in samples) is our LRSchedule state: equal to the flags' own
    schedule when they describe the same one, and what --use-checkpoint-opt_param-scheduler continues from."""
    from megatron.checkpoint.argonne import argonne_lr_state
    from megatron.optimizer.lr_schedule import _NoParams, build_lr_scheduler, schedule_differences

    state = argonne_lr_state(af.UPSTREAM_SCHEDULER, 4)
    assert (state["num_steps"], state["warmup_steps"], state["decay_steps"], state["increment"]) == (3, 2, 8, 1)
    run = parse_args(GPT_ARGV)
    assert schedule_differences(run, state, 1) == []
    other = parse_args(GPT_ARGV + ["--lr", "1e-3", "--use-checkpoint-opt_param-scheduler"])
    assert any(line.startswith("--lr:") for line in schedule_differences(other, state, 1))
    truth = build_lr_scheduler(_NoParams(), run, 1)
    for _ in range(3):
        truth.step()
    taken = build_lr_scheduler(_NoParams(), other, 1)
    taken.load_state_dict(state)  # the checkpoint's shape and position
    for _ in range(4):
        assert taken.get_lr() == pytest.approx(truth.get_lr(), rel=1e-12)
        taken.step()
        truth.step()
    # lengths that are not whole global batches stay in samples (stepped by the global batch): still their schedule
    odd = argonne_lr_state(dict(af.UPSTREAM_SCHEDULER, lr_warmup_steps=6), 4)
    assert (odd["increment"], odd["num_steps"], odd["warmup_steps"], odd["decay_steps"]) == (4, 12, 6, 32)


def test_describe_reads_their_schedule(built):
    from megatron.checkpoint.resume import describe

    root, _ = built
    desc = describe("argonne", str(root / "gpt_nopipe"), "global_step3")
    assert desc.lr_scheduler["num_steps"] == 3 and desc.lr_scheduler["max_lr"] == 3e-3
