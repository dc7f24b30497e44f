"""SFT and DPO on the training engine (finetune_gpt.py's tasks): the layouts agree with one rank, the global-batch
normalisation, SFT's loss against Hugging Face's, DPO's reference store and its refusals, and resume."""

import math
import re

import pytest
import torch

from multirank import run_ranks
from post_training_cases import TINY_POST, post_training_cases


def _close(a, b, tol=1e-5):
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b)) and len(a) == len(b)


def test_tp2_pp2_dp2_zero1_and_zero3_equal_one_rank_for_sft_and_dpo(tmp_path):
    """8 gloo ranks (tp 2 × pp 2 × dp 2, ZeRO-1, DeepSpeed's pipeline engine) and 2 (dp 2, ZeRO-3) against one rank:
    the first 3 steps' losses and DPO's metrics within 1e-5 (fp32), the reference pass included (each layout
    computes its own); SFT also packed (document ids and positions per example, through the pipe stages)."""
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--zero-stage", "1"]
    single = run_ranks(1, post_training_cases, [
        ("sft", ["--task", "sft"], TINY_POST),
        ("sft-packed", ["--task", "sft", "--packing"], TINY_POST),
        ("dpo", ["--task", "dpo", "--ref-logps-path", str(tmp_path / "one.pt"), "--rpo-alpha", "0.5"], TINY_POST)],
        timeout=600)[0]
    eight = run_ranks(8, post_training_cases, [
        ("sft", ["--task", "sft"], TINY_POST + layout),
        ("sft-packed", ["--task", "sft", "--packing"], TINY_POST + layout),
        ("dpo", ["--task", "dpo", "--ref-logps-path", str(tmp_path / "eight.pt"), "--rpo-alpha", "0.5"],
         TINY_POST + layout)], timeout=900)
    zero3 = run_ranks(2, post_training_cases, [  # the other engine path: dp 2, ZeRO-3 (pp > 1 refuses ZeRO-2/3)
        ("dpo", ["--task", "dpo", "--ref-logps-path", str(tmp_path / "zero3.pt"), "--rpo-alpha", "0.5"],
         TINY_POST + ["--zero-stage", "3"])], timeout=600)
    for rank, result in enumerate(zero3):
        assert _close(result["dpo"]["losses"], single["dpo"]["losses"]), (rank, result["dpo"]["losses"])
        assert _close(list(result["dpo"]["metrics"][-1].values()), list(single["dpo"]["metrics"][-1].values()))
    for name in ("sft", "sft-packed", "dpo"):
        for rank, result in enumerate(eight):
            assert _close(result[name]["losses"], single[name]["losses"]), (name, rank, result[name]["losses"],
                                                                            single[name]["losses"])
    assert single["sft"]["losses"][-1] < single["sft"]["losses"][0]
    for rank, result in enumerate(eight):
        for got, want in zip(result["dpo"]["metrics"], single["dpo"]["metrics"]):
            assert set(got) == set(want) and _close(list(got.values()), list(want.values())), (rank, got, want)
    torch.testing.assert_close(torch.tensor(eight[0]["dpo"]["reference"]), torch.tensor(single["dpo"]["reference"]),
                               rtol=1e-5, atol=1e-5)
    first = single["dpo"]["metrics"][0]  # step 1: the policy is the reference
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)


def _halves(tmp_path, task_argv, name):
    """(uninterrupted 4 steps, first 2 steps saved, resumed 2 steps) for one task."""
    save = str(tmp_path / f"ckpt-{name}")
    full = TINY_POST + ["--train-iters", "4"]
    saving = ["--save", save, "--save-interval", "100"]
    return [(f"{name}-full", task_argv(f"{name}-full"), full, 64),
            (f"{name}-first", task_argv(name), full + ["--exit-interval", "2"] + saving, 64),
            (f"{name}-resumed", task_argv(name), full + ["--load", save] + saving, 64)]


def test_resume_is_bit_exact_for_sft_and_dpo_and_the_stored_reference_is_checked(tmp_path):
    """CPU fp32: a run stopped after step 2 and resumed gives steps 3-4 bit for bit (losses and DPO's metrics); the
    resumed DPO run reads the stored reference its checkpoint names. A stored reference made from other data is
    refused naming both; --recompute-ref-logps replaces it. The post-training flags are in the checkpoint's saved
    arguments; a resume with another --dpo-beta / --rpo-alpha is refused (naming both values), takes the checkpoint's
    under --use-checkpoint-opt_param-scheduler (then steps 3-4 are the uninterrupted run's) and the flag's under
    --override-opt_param-scheduler, as the optimizer's hyperparameters are; another --task is refused."""
    ref = lambda name: str(tmp_path / f"{name}.ref.pt")  # noqa: E731
    dpo = lambda name: ["--task", "dpo", "--ref-logps-path", ref(name)]  # noqa: E731
    dpo_full, dpo_first, dpo_resumed = _halves(tmp_path, dpo, "dpo")
    resuming = TINY_POST + ["--train-iters", "4", "--load", str(tmp_path / "ckpt-dpo")]  # from dpo-first's step 2
    flag_cases = [  # a resume with other post-training flags: checked by the policy of the other hyperparameters
        ("beta-changed", dpo("dpo") + ["--dpo-beta", "0.2", "--rpo-alpha", "1"], resuming, 64),
        ("beta-of-checkpoint", dpo("dpo") + ["--dpo-beta", "0.2"],
         resuming + ["--use-checkpoint-opt_param-scheduler"], 64),
        ("beta-of-flags", dpo("dpo") + ["--dpo-beta", "0.2"], resuming + ["--override-opt_param-scheduler"], 64),
        ("task-changed", ["--task", "sft"], resuming, 64)]
    cases = _halves(tmp_path, lambda name: ["--task", "sft"], "sft") + [dpo_full, dpo_first] + flag_cases + [
        dpo_resumed] + [
        ("other-data", dpo("dpo"), TINY_POST + ["--train-iters", "1"], 48),
        ("recomputed", dpo("dpo") + ["--recompute-ref-logps"], TINY_POST + ["--train-iters", "1"], 48),
        # the resumed run's reference file now holds the 48-pair reference: resuming again is refused
        ("resumed-again", dpo("dpo"), TINY_POST + ["--train-iters", "6", "--load", str(tmp_path / "ckpt-dpo"),
                                                  "--use-checkpoint-opt_param-scheduler"], 64)]
    from post_training_cases import guarded_cases

    out = run_ranks(1, guarded_cases, cases, timeout=600)[0]
    for name in ("sft", "dpo"):
        full, first, resumed = out[f"{name}-full"], out[f"{name}-first"], out[f"{name}-resumed"]
        assert first["losses"] == full["losses"][:2] and resumed["start_iteration"] == 2
        assert resumed["losses"] == full["losses"][2:], name
        assert resumed["metrics"] == full["metrics"][2:], name
    assert any("DPO reference log-probabilities from" in line for line in out["dpo-resumed"]["lines"])
    error = out["other-data"]["error"]
    assert "dpo examples=64" in error and "dpo examples=48" in error and "--recompute-ref-logps" in error
    assert "losses" in out["recomputed"] and len(out["recomputed"]["reference"]) == 48
    error = out["beta-changed"]["error"]
    assert "--dpo-beta 0.2 differs from the checkpoint's 0.1" in error, error
    assert "--rpo-alpha 1.0 differs from the checkpoint's off" in error and "--finetune" in error, error
    assert out["beta-of-checkpoint"]["losses"] == out["dpo-full"]["losses"][2:]  # beta 0.1 taken: the same steps
    assert any("--dpo-beta: using the checkpoint's 0.1" in line for line in out["beta-of-checkpoint"]["lines"])
    assert out["beta-of-flags"]["losses"] != out["dpo-full"]["losses"][2:]  # beta 0.2: another loss
    assert any("--dpo-beta: using the flag's 0.2" in line for line in out["beta-of-flags"]["lines"])
    error = out["task-changed"]["error"]
    assert "--task sft: the checkpoint was saved by a --task dpo run" in error, error
    from megatron.checkpoint.saved_args import saved_args_of

    saved = saved_args_of(str(tmp_path / "ckpt-dpo"))[1]  # what --use-checkpoint-args and a resume read
    assert (saved["task"], saved["dpo_beta"], saved["dpo_loss"], saved["packing"]) == ("dpo", 0.1, "sigmoid", False)
    assert saved_args_of(str(tmp_path / "ckpt-sft"))[1]["task"] == "sft"
    error = out["resumed-again"]["error"]
    assert "cannot be recomputed from the resumed (trained) policy" in error and "dpo examples=64" in error, error


def test_finetune_gpt_refuses_bad_flags_once_with_exit_code_2_and_no_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for argv, words in ((["--task", "dpo", "--dpo-beta", "0"], "--dpo-beta must be > 0"),
                        (["--task", "sft", "--mock-data", "--vocab-size", "64", "--model-preset", "tiny"],
                         "--mock-data has no prompts or responses")):
        done = subprocess.run([sys.executable, str(root / "finetune_gpt.py"), *argv], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count(words) == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("finetune_gpt.py: ") or "\nfinetune_gpt.py: " in done.stderr, done.stderr


def _tiny_hf_llama(path):
    """TINY_POST's model as a randomly initialised transformers LlamaForCausalLM folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from post_training_cases import VOCAB

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def test_sft_loss_equals_hugging_faces_with_prompt_labels_ignored(tmp_path):
    """Step 1's SFT loss (before any update; 4 micro-batches of unequal loss-token counts) equals transformers'
    loss of the same model on the same global batch with the prompt and padding labels set to -100: the mean over
    the loss tokens of the whole global batch, not a mean of per-micro-batch means."""
    from post_training_cases import SyntheticSFT

    hf = _tiny_hf_llama(tmp_path / "hf")
    data = SyntheticSFT(64)
    tokens = torch.stack([torch.from_numpy(data[i]["tokens"]) for i in range(8)])
    mask = torch.stack([torch.from_numpy(data[i]["loss_mask"]) for i in range(8)])
    labels = tokens.clone()
    labels[:, 1:][mask == 0] = -100
    labels[:, 0] = -100
    with torch.no_grad():  # transformers shifts the labels itself: label t + 1 is predicted at position t
        expected = hf(input_ids=tokens, labels=labels).loss
    from post_training_cases import guarded_cases

    argv = TINY_POST + ["--train-iters", "1", "--load", str(tmp_path / "hf"), "--finetune", "--disable-bias-linear"]
    out = run_ranks(1, guarded_cases, [("sft", ["--task", "sft"], argv, 64)], timeout=300)[0]["sft"]
    assert "error" not in out, out
    per_micro_batch = []
    for start in range(0, 8, 2):
        with torch.no_grad():
            per_micro_batch.append(hf(input_ids=tokens[start:start + 2], labels=labels[start:start + 2]).loss)
    assert abs(torch.stack(per_micro_batch).mean() - expected) > 1e-3  # the two normalisations differ here
    assert out["losses"][0] == pytest.approx(expected.item(), rel=1e-5), (out["losses"][0], expected.item())


def test_dpo_on_the_examples_preferences_raises_held_out_reward_accuracy(tmp_path):
    """examples/post_train_cpu.py's preference set (stdlib sentences: the words in order preferred to them
    reversed), preprocessed by tools/preprocess_data.py --task dpo; a tiny model trained with DPO for 150 steps from
    its own reference: rewards/accuracies on the held-out 10% of the pairs ends well above 0.5 (it is 0 at the start,
    where policy and reference are equal)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    from post_train_cpu import build_preference_data

    from tools import preprocess_data

    data = build_preference_data(str(tmp_path / "data"), examples=400)
    prefix = str(tmp_path / "data" / "dpo")
    assert preprocess_data.main(["--task", "dpo", "--input", data["dpo"], "--output-prefix", prefix, "--quiet",
                                 *data["tokenizer_flags"]]) == 0
    argv = ["--task", "dpo", "--dpo-beta", "0.1", "--data-path", prefix + "_text_document", *data["tokenizer_flags"],
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
            "--seq-length", "48", "--max-position-embeddings", "48", "--normalization", "rmsnorm", "--swiglu",
            "--position-embedding-type", "rope", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", "150", "--lr", "3e-3",
            "--lr-decay-style", "constant", "--split", "90,10,0", "--eval-interval", "150", "--eval-iters", "3",
            "--log-interval", "50", "--zero-stage", "0", "--num-workers", "0", "--tensorboard-log-interval", "1"]
    from post_training_cases import finetune_cases

    out = run_ranks(1, finetune_cases, [("dpo", argv)], timeout=600)[0]["dpo"]
    assert out["metrics"][0]["rewards/accuracies"] == 0.0  # step 1: the policy is the reference
    held_out = out["eval_metrics"][150]
    assert held_out["rewards/accuracies"] >= 0.75, held_out
    assert held_out["rewards/margins"] > 0, held_out
    assert (tmp_path / "data" / "dpo_text_document.dpo_reference.pt").exists()  # stored beside the data
    # the log line: the DPO loss as `lm loss`, then TRL's metrics; the tracker gets them under TRL's names
    line = next(line for line in out["lines"] if line.startswith(" iteration=     150/"))
    assert re.search(r"\| lm loss=[\d.]+ \| rewards/chosen=-?[\d.]+ \| rewards/rejected=-?[\d.]+ \| "
                     r"rewards/accuracies=[\d.]+ \| rewards/margins=-?[\d.]+ \| logps/chosen=-[\d.]+ \| "
                     r"logps/rejected=-[\d.]+ \| grad_norm=", line), line
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert len(out["scalars"][name]) == 150 and f"val/{name}" in out["scalars"]
    assert out["scalars"]["lm-loss-training/lm loss"][1] == pytest.approx(math.log(2), abs=1e-5)


def test_finetune_flags_are_checked_and_what_post_training_cannot_run_is_refused_by_name():
    import finetune_gpt
    from megatron.cli import parse_args
    from megatron.config.post_training import split_post_training_args
    from megatron.errors import ConfigError

    config, rest = split_post_training_args(["--task", "dpo", "--dpo-loss", "ipo", "--dpo-beta", "0.5", "--lr", "1"])
    assert (config.task, config.dpo_loss, config.dpo_beta, rest) == ("dpo", "ipo", 0.5, ["--lr", "1"])
    for argv, words in ((["--lr", "1"], "--task"), (["--task", "dpo", "--label-smoothing", "0.5"], "[0, 0.5)"),
                        (["--task", "dpo", "--dpo-loss", "hinge", "--label-smoothing", "0.1"], "sigmoid or robust"),
                        (["--task", "sft", "--rpo-alpha", "1"], "--rpo-alpha configure DPO"),
                        (["--task", "dpo", "--dpo-loss", "nca"], "invalid choice")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            split_post_training_args(argv)
    run = parse_args(TINY_POST + ["--ds-sequence-parallel-size", "2"])
    with pytest.raises(ConfigError) as refused:
        finetune_gpt.check_post_training_run(run)
    assert "--ds-sequence-parallel-size 2" in str(refused.value) and "--mock-data" in str(refused.value)


def test_a_packed_dpo_step_equals_the_padded_step_on_the_same_pairs(tmp_path):
    """2 gloo ranks: padded DPO at dp 2 (8 pairs a global batch, one a row pair) against packed DPO (row pairs of 1,
    3, 2 and 2 pairs, 4 row pairs a global batch: the same 8 pairs) at dp 2 (micro-batches of 2 row pairs: pair_ids
    padded with -1, the ranks holding 4 pairs each) and at pp 2 (DeepSpeed's pipeline engine, micro-batches of one
    row pair of 1, 3, 2, 2 pairs, the document ids travelling to the last stage's pair loss) and at tp 2
    (vocab-parallel cross entropy, micro-batches of 2 row pairs with gradient accumulation 2): the reference
    log-probabilities, and the first 3 steps' losses and TRL metrics, within 1e-5 (fp32). cDPO and RPO are on, so
    every term of the loss is compared."""
    from post_training_cases import packed_dpo_cases

    dpo = lambda name, *extra: ["--task", "dpo", "--ref-logps-path", str(tmp_path / f"{name}.pt"),  # noqa: E731
                                "--label-smoothing", "0.1", "--rpo-alpha", "0.5", *extra]
    out = run_ranks(2, packed_dpo_cases, [
        ("padded", dpo("padded"), TINY_POST),
        ("packed", dpo("packed", "--packing"), TINY_POST + ["--micro-batch-size", "2", "--global-batch-size", "4"]),
        ("packed-pp2", dpo("packed-pp2", "--packing"), TINY_POST + [
            "--micro-batch-size", "1", "--global-batch-size", "4", "--pipeline-model-parallel-size", "2"]),
        ("packed-tp2", dpo("packed-tp2", "--packing"), TINY_POST + [
            "--micro-batch-size", "2", "--global-batch-size", "4", "--tensor-model-parallel-size", "2"])],
        timeout=600)
    for rank, result in enumerate(out):
        padded = result["padded"]
        assert len(padded["losses"]) == 3 and padded["losses"][2] != padded["losses"][0]
        for name in ("packed", "packed-pp2", "packed-tp2"):
            assert _close(result[name]["losses"], padded["losses"]), (rank, name, result[name]["losses"],
                                                                      padded["losses"])
            for got, want in zip(result[name]["metrics"], padded["metrics"]):
                assert set(got) == set(want) and _close(list(got.values()), list(want.values())), (rank, name, got)
            torch.testing.assert_close(torch.tensor(result[name]["reference"]), torch.tensor(padded["reference"]),
                                       rtol=1e-5, atol=1e-5)


def test_dry_run_shows_the_post_training_flags(tmp_path, capsys):
    """finetune_gpt.py --dry-run prints the task's settings (== task) before the layout, with the data's blend."""
    import json

    import numpy as np

    import finetune_gpt
    from megatron.data.indexed_dataset import write_dataset

    prefix = str(tmp_path / "pairs_text_document")
    sequences = [np.arange(3, 9 + k % 4) for k in range(8)]
    write_dataset(prefix, sequences, np.int32)
    write_dataset(prefix + "_loss_mask", [np.ones(len(s), np.uint8) for s in sequences], np.uint8)
    with open(prefix + ".post_training.json", "w") as f:
        json.dump({"format": 1, "task": "dpo", "examples": 4, "sequences": 8, "tokenizer": {"eod": 0}}, f)
    argv = [a for a in TINY_POST if a != "--mock-data"] + ["--data-path", prefix, "--dry-run", "1"]
    code = finetune_gpt.main(["--task", "dpo", "--dpo-beta", "0.3", "--label-smoothing", "0.1", "--packing",
                              "--rpo-alpha", "0.5", *argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    task = out.out.split("== task\n", 1)[1].split("\n\n", 1)[0]
    assert "--task dpo; sequences packed (--packing), overlong examples: truncate" in task, task
    assert "--dpo-beta 0.3, --dpo-loss sigmoid with label smoothing 0.1, --rpo-alpha 0.5" in task, task
    assert out.out.index("== task") < out.out.index("== layout")


def test_dpo_loads_our_universal_and_argonne_checkpoints(tmp_path):
    """--load for post-training: DPO started (--finetune) from our SFT checkpoint, from the same checkpoint as a
    DeepSpeed universal folder, and from argonne-lcf/Megatron-DeepSpeed's own checkpoint (tests/data/upstream,
    its shape taken by --use-checkpoint-args). The reference pass is the loaded model's forward: ours and universal
    give the same log-probabilities (not those of a fresh model), and argonne's equal those of its Hugging Face
    export (tools/convert_checkpoint.py to-hf, tested against upstream's own forward) within 1e-4 (with
    --no-loss-over-padded-vocab, the softmax over the real vocabulary that the export has)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from post_training_cases import SyntheticDPO, collate_dpo, loading_cases
    from tools.convert_checkpoint import main as convert
    from upstream_fixtures import copy_checkpoint

    argonne = copy_checkpoint("dp2_fp32", tmp_path / "argonne")
    out = run_ranks(1, loading_cases, {"tmp": str(tmp_path), "argonne": str(argonne)}, timeout=600)[0]
    ours = torch.tensor(out["ours"]["reference"], dtype=torch.float64)
    universal = torch.tensor(out["universal"]["reference"], dtype=torch.float64)
    torch.testing.assert_close(universal, ours, rtol=1e-6, atol=1e-6)
    assert (ours - torch.tensor(out["scratch"]["reference"])).abs().max() > 1e-2  # the SFT weights were loaded
    assert any("loaded" in line and "universal" in line for line in out["universal"]["lines"])
    engine = {kind: torch.tensor([x for row in rows for x in row], dtype=torch.float64)
              for kind, rows in out["engine"].items()}  # InferenceEngine.from_checkpoint's scores of both folders
    torch.testing.assert_close(engine["universal"], engine["ours"], rtol=0, atol=1e-6)

    assert convert(["to-hf", "--load", str(argonne), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    batch = collate_dpo([SyntheticDPO(64)[i] for i in range(64)])
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"][:, :-1]).logits
    nll = F.cross_entropy(logits.transpose(1, 2), batch["tokens"][:, 1:], reduction="none")
    logps = -(nll * batch["loss_mask"]).sum(-1)
    expected = torch.stack(logps.double().chunk(2), dim=1)  # [pairs, (chosen, rejected)]
    torch.testing.assert_close(torch.tensor(out["argonne"]["reference"], dtype=torch.float64), expected, rtol=1e-4,
                               atol=1e-4)
