"""--loss-over-padded-vocab: the loss's softmax spans the padded vocabulary (upstream's), its padding rows train,
and they travel through resharding; without it they are masked and dropped."""

import torch

from megatron.config.arguments import parse_args
from megatron.distributed.parallel_state import ParallelState
from megatron.model.gpt_model import GPTModel
from megatron.model.sharding import shard_state_dict

FLAGS = ["--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
         "--mock-data", "--vocab-size", "20", "--make-vocab-size-divisible-by", "8", "--train-iters", "1",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--untie-embeddings-and-output-weights"]


def _loss_and_grad(*flags):
    run = parse_args(FLAGS + list(flags))
    model = GPTModel(run.model, ParallelState.single(), seed=3)
    with torch.no_grad():  # padding rows as a checkpoint that trained them would hold them
        model.output_layer.weight[run.model.vocab_size:] = 0.5
    tokens = torch.randint(0, run.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])
    return run, model, logits, tokens, None


def test_flag_selects_the_softmax_span_and_trains_the_padding():
    run, model, logits, tokens, _ = _loss_and_grad("--loss-over-padded-vocab")
    assert run.model.vocab_size == 21 and run.model.padded_vocab_size() == 24 and run.model.loss_over_padded_vocab
    from megatron.core.cross_entropy import vocab_parallel_cross_entropy

    labels = tokens[:, 1:]
    over_padded = vocab_parallel_cross_entropy(logits, labels, None, run.model.loss_vocab_size)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 24).float(), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(over_padded.reshape(-1), expected, rtol=1e-6, atol=1e-6)
    over_padded.mean().backward()
    assert model.output_layer.weight.grad[21:].abs().sum() > 0  # the padding rows train

    masked_run, masked_model, masked_logits, _, _ = _loss_and_grad("--no-loss-over-padded-vocab")
    assert masked_run.model.loss_vocab_size == 21
    masked = vocab_parallel_cross_entropy(masked_logits, labels, None, masked_run.model.loss_vocab_size)
    expected = torch.nn.functional.cross_entropy(masked_logits[..., :21].reshape(-1, 21).float(), labels.reshape(-1),
                                                 reduction="none")
    torch.testing.assert_close(masked.reshape(-1), expected, rtol=1e-6, atol=1e-6)
    masked.mean().backward()
    assert masked_model.output_layer.weight.grad[21:].abs().sum() == 0
    assert parse_args(FLAGS).model.loss_over_padded_vocab is False  # default off for a new run


def test_resharding_keeps_trained_padding_rows_only_with_the_flag():
    run = parse_args(FLAGS + ["--loss-over-padded-vocab"])
    full = torch.arange(24 * 16, dtype=torch.float32).reshape(24, 16)  # rows 21..23: trained padding
    kept = shard_state_dict({"output_layer.weight": full}, run.model, 2, 1)["output_layer.weight"]
    assert kept.shape[0] == 16  # tp 2 pads 21 to 32: rank 1 holds rows 16..31
    assert torch.equal(kept[:8], full[16:]) and kept[8:].abs().sum() == 0  # every trained row kept
    dropped = shard_state_dict({"output_layer.weight": full}, run.model.replace(loss_over_padded_vocab=False), 2, 1)
    assert torch.equal(dropped["output_layer.weight"][:5], full[16:21])
    assert dropped["output_layer.weight"][5:].abs().sum() == 0
    smaller = run.model.replace(make_vocab_size_divisible_by=1)  # pads 21 to 22 at tp 2: no room for rows 22, 23
    try:
        shard_state_dict({"output_layer.weight": full}, smaller, 2, 0)
        raise AssertionError("trained padding rows that do not fit were dropped silently")
    except ValueError as error:
        assert "--no-loss-over-padded-vocab" in str(error)


def _plan(saved_config, *flags, kind="ours"):
    from megatron.checkpoint.resume import CheckpointDescription, plan_resume

    run = parse_args(FLAGS + ["--load", "ckpt"] + list(flags))
    optimizer = run.training.optimizer.optimizer
    desc = CheckpointDescription(kind, "ckpt", "global_step1", "ckpt/global_step1", None, {"optimizer": optimizer},
                                 saved_config, optimizer, has_optimizer_state=True, has_rng=True, lr_scheduler=None)
    return plan_resume(desc, run, ParallelState.single())


def test_resume_follows_how_the_checkpoint_was_trained_unless_told():
    run = parse_args(FLAGS)
    trained = run.model.replace(loss_over_padded_vocab=True)
    plan = _plan(trained)
    assert plan.run.model.loss_over_padded_vocab
    assert any("softmax runs over the padded vocabulary (24 columns for 21 tokens)" in n for n in plan.notices)
    assert not _plan(trained, "--no-loss-over-padded-vocab").run.model.loss_over_padded_vocab
    assert not _plan(run.model).run.model.loss_over_padded_vocab  # a checkpoint that masked: masked
    assert _plan(run.model, "--loss-over-padded-vocab").run.model.loss_over_padded_vocab
    # trained rows this run's padding has no room for: refused, naming both sizes and the ways out
    wider = trained.replace(make_vocab_size_divisible_by=32)  # 32 rows against this run's 24
    try:
        _plan(wider, "--make-vocab-size-divisible-by", "32", "--loss-over-padded-vocab")  # same padding: fine
        _plan(wider)
        raise AssertionError("trained padding rows beyond this run's padding were accepted")
    except Exception as error:  # ConfigError
        assert "trained 32 vocabulary rows" in str(error) and "--no-loss-over-padded-vocab" in str(error)


def test_older_null_tokenizer_checkpoints_keep_their_convention():
    """A checkpoint of ours saved when --vocab-size V meant V tokens (EOD V - 1): its model has exactly the flag's
    V tokens, and the resumed run keeps them (a new run has V + 1, EOD V, as upstream)."""
    run = parse_args(FLAGS)
    assert run.model.vocab_size == 21  # --vocab-size 20, now
    older = run.model.replace(vocab_size=20)
    plan = _plan(older)
    assert plan.run.model.vocab_size == 20
    assert any("older NullTokenizer convention" in n and "end-of-document id 19" in n for n in plan.notices)
    assert _plan(run.model).run.model.vocab_size == 21  # saved with the current convention: as it is
    try:
        _plan(run.model.replace(vocab_size=30))
        raise AssertionError("another vocabulary was accepted")
    except Exception as error:
        assert "--vocab-size or the tokenizer's vocabulary gives 21" in str(error)


def older_convention_resume(rank, world_size, save_dir):
    """pretrain_gpt.main: a checkpoint with the model of --vocab-size 128 under the older convention (128 tokens,
    written here by a run of --vocab-size 127), resumed with --vocab-size 128 (and --eod-mask-loss, which runs
    with the EOD id the loop takes from the kept convention; not checked further here)."""
    import contextlib
    import io

    import engine_cases as ec
    import megatron.distributed
    import pretrain_gpt

    megatron.distributed.destroy_distributed = lambda: None  # run_ranks tears the group down at the end
    base = [a for a in ec.TINY if a not in ("--train-iters", "10")]
    out = {}
    saving = ["--save", save_dir, "--save-interval", "1", "--exit-interval", "1"]
    for name, argv in (("old", ["--vocab-size", "127", "--train-iters", "2"] + saving),
                       ("resume", ["--vocab-size", "128", "--train-iters", "2", "--load", save_dir,
                                   "--eod-mask-loss"])):
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            out[name] = (pretrain_gpt.main(base + argv), text.getvalue())
    return out


def test_an_older_convention_checkpoint_resumes_through_the_loop(tmp_path):
    from multirank import run_ranks

    result = run_ranks(1, older_convention_resume, str(tmp_path / "ckpt"), timeout=300)[0]
    assert result["old"][0] == 0, result["old"][1][-2000:]
    code, text = result["resume"]
    assert code == 0, text[-2000:]
    assert "older NullTokenizer convention (--vocab-size 128 meant 128 tokens, end of document 127)" in text
    assert "loaded " in text and "at iteration 1" in text
