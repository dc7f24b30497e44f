"""lm-eval on our checkpoint (model type "megatron", tools/evaluate.py's path) scores the local tasks as lm-eval's
own `hf` backend does on the exported model, and as its `local-completions` backend does through our server:
log-likelihoods within 1e-4, the same greedy flags, the same generations, the same metrics."""

import os

import pytest

from tests.serve_fixtures import build_tiny_served_model, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval")

from tools.evaluate import LOCAL_TASKS, evaluate  # noqa: E402

TASKS = ["stdlib_builtins_mc", "stdlib_zen_complete", "stdlib_zen_rolling"]
LIMIT = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluated")
    return {**build_tiny_served_model(str(root)), "root": str(root)}


@pytest.fixture(scope="module")
def ours(model):
    from megatron.inference import InferenceEngine
    from megatron.inference.lm_eval_adapter import MegatronLM

    lm = MegatronLM(InferenceEngine.from_checkpoint(model["ckpt"]), batch_size=4)
    return evaluate(lm, TASKS, LOCAL_TASKS, limit=LIMIT, log_samples=True)


def _responses(results) -> dict:
    """{(task, doc_id): the model's raw answers} of a run with log_samples."""
    return {(task, s["doc_id"]): s["resps"] for task, samples in results["samples"].items() for s in samples}


def _assert_same(ours, theirs) -> None:
    mine, other = _responses(ours), _responses(theirs)
    assert mine.keys() == other.keys() and len(mine) == LIMIT * len(TASKS)
    for key, answers in mine.items():
        for a, b in zip(answers, other[key]):
            a, b = a[0], b[0]
            if isinstance(a, str):  # generate_until
                assert a == b, key
            elif isinstance(a, (tuple, list)):  # loglikelihood: (log-prob, is_greedy)
                assert abs(a[0] - b[0]) < 1e-4 and bool(a[1]) == bool(b[1]), (key, a, b)
            else:  # loglikelihood_rolling
                assert abs(a - b) < 1e-4, (key, a, b)
    for task in TASKS:
        for metric, value in ours["results"][task].items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs["results"][task][metric], rel=1e-4, abs=1e-4), (task, metric)


def test_megatron_model_type_scores_as_lm_evals_hf_backend_on_the_export(model, ours):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=model["hf"], dtype="float32", device="cpu", batch_size=4)
    _assert_same(ours, evaluate(hf, TASKS, LOCAL_TASKS, limit=LIMIT, log_samples=True))


def test_megatron_model_type_scores_as_local_completions_on_our_server(model, ours):
    pytest.importorskip("tenacity", reason="lm-eval's API backends need lm-eval[api] (the test extra installs it)")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url, procs = start_server(model["ckpt"], log_dir=model["root"])
    try:
        api = LocalCompletionsAPI(base_url=url + "/v1/completions", model="ckpt", tokenizer_backend="huggingface",
                                  tokenizer=model["hf"], max_length=256, num_concurrent=1, max_retries=1)
        theirs = evaluate(api, TASKS, LOCAL_TASKS, limit=LIMIT, log_samples=True)
    finally:
        assert stop_server(procs) == [0]
    _assert_same(ours, theirs)


def test_evaluate_cli_writes_the_results(model, tmp_path):
    from tools.evaluate import main

    out = str(tmp_path / "results.json")
    assert main(["--load", model["ckpt"], "--tasks", "stdlib_builtins_mc", "--limit", "2", "--output-path", out]) == 0
    import json

    assert "stdlib_builtins_mc" in json.load(open(out))["results"]
    assert main(["--load", model["ckpt"], "--tasks", "x", "--include-path", os.path.join(model["root"], "none")]) == 2


def _evaluate_on_ranks(rank, world_size, ckpt):
    from megatron.inference import InferenceEngine
    from megatron.inference.lm_eval_adapter import MegatronLM

    engine = InferenceEngine.from_checkpoint(ckpt, tp=1, pp=1)  # 2 ranks: dp 2
    ps = engine.ps
    lm = MegatronLM(engine, batch_size=4, dp_group=ps.groups["dp"], dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    results = evaluate(lm, TASKS, LOCAL_TASKS, limit=LIMIT, log_samples=True)
    return (ps.dp_size, None if results is None else {"samples": results["samples"], "results": results["results"]})


def test_dp2_evaluation_shards_the_documents_and_scores_as_one_rank(model, ours):
    from tests.multirank import run_ranks

    outputs = run_ranks(2, _evaluate_on_ranks, model["ckpt"], timeout=600)
    assert [dp for dp, _ in outputs] == [2, 2] and outputs[1][1] is None
    _assert_same(ours, outputs[0][1])  # rank 0 holds every dp replica's documents
