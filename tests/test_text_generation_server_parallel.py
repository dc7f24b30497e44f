"""tools/run_text_generation_server.py at tp = 2 and at pp = 2 (two ranks launched as torchrun does) answers
exactly as the tp = 1 engine: the same text, log-probs within float rounding; SIGTERM drains a request in flight
and stops both ranks with exit code 0; under mpiexec, a request joins the running batch of another and both answer
as tp = 1 alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.serve_fixtures import ROOT, build_tiny_served_model, start_server, stop_server, wait_for_health

pytest.importorskip("fastapi")

UPSTREAM = {"prompts": ["def area(r):", "import json\nfrom textwrap import"], "tokens_to_generate": 12,
            "top_k": 1, "logprobs": True}
OPENAI = {"prompt": "class Shape:", "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 2}


def _post(url: str, body: dict, method: str = "POST") -> dict:
    out = subprocess.run(["curl", "-s", "-f", "-X", method, url, "-H", "Content-Type: application/json", "-d",
                          json.dumps(body)], capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out)


def _reference(load: str) -> dict:
    """What the server computes, on the tp = 1 engine in this process."""
    from megatron.inference import InferenceEngine
    from megatron.inference import api_openai as oai
    from megatron.inference import api_upstream as up

    engine = InferenceEngine.from_checkpoint(load)
    tok = engine.tokenizer
    req = up.parse_upstream_request(UPSTREAM)
    prompts = up.tokenize_prompts(req, tok)
    padded = up.check_lengths(req, prompts, engine.max_sequence_length, None)
    upstream = up.upstream_reply(req, engine.generate(prompts, up.sampling_params(req, prompts, padded)), tok)
    creq = oai.parse_request(oai.CompletionRequest, OPENAI)
    ids = oai.completion_prompts(creq, tok, engine.vocab_size)
    [result] = engine.generate(ids, oai.sampling_params(creq, 8, creq.logprobs))
    return {"upstream": upstream, "openai": oai.completion_choice(0, result, creq, tok)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("served_parallel")
    paths = build_tiny_served_model(str(root), seq_length=128)
    return {**paths, "root": str(root), "reference": _reference(paths["ckpt"])}


def _check_answers(url: str, reference: dict) -> None:
    upstream = _post(url + "/api", UPSTREAM, method="PUT")
    assert upstream["text"] == reference["upstream"]["text"]
    assert upstream["segments"] == reference["upstream"]["segments"]
    for ours, theirs in zip(upstream["logprobs"], reference["upstream"]["logprobs"]):
        assert len(ours) == len(theirs) and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    choice = _post(url + "/v1/completions", {**OPENAI, "model": "ckpt"})["choices"][0]
    expected = reference["openai"]
    assert choice["text"] == expected["text"]
    assert choice["logprobs"]["tokens"] == expected["logprobs"]["tokens"]
    for ours, theirs in zip(choice["logprobs"]["token_logprobs"][1:], expected["logprobs"]["token_logprobs"][1:]):
        assert abs(ours - theirs) < 1e-4
    for ours, theirs in zip(choice["logprobs"]["top_logprobs"][1:], expected["logprobs"]["top_logprobs"][1:]):
        assert max(ours.values()) == pytest.approx(max(theirs.values()), abs=1e-4)


def test_a_tp2_server_answers_as_tp1_and_sigterm_drains_a_request_in_flight(model):
    log_dir = os.path.join(model["root"], "tp2")
    os.makedirs(log_dir)
    url, procs = start_server(model["ckpt"], ranks=2, extra=("--tensor-model-parallel-size", "2"), log_dir=log_dir)
    try:
        _check_answers(url, model["reference"])
        long_request = {"prompt": "def", "max_tokens": 100, "temperature": 0, "n": 8, "model": "ckpt"}
        reply = {}
        worker = threading.Thread(target=lambda: reply.update(_post(url + "/v1/completions", long_request)))
        worker.start()
        in_flight = 0
        while worker.is_alive() and not in_flight:  # wait until the server holds the request (a wait, not a timing)
            in_flight = _post(url + "/health", {}, method="GET")["in_flight"]
            time.sleep(0.02)
        for p in procs:  # torchrun forwards SIGTERM to every rank
            p.send_signal(signal.SIGTERM)
        worker.join(timeout=600)
        assert in_flight == 1, "the request ended before SIGTERM: the drain was not exercised"
        assert len(reply["choices"]) == 8 and all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    finally:
        codes = stop_server(procs)
    assert codes == [0, 0], open(os.path.join(log_dir, "server_rank1.log")).read()[-2000:]


def test_a_pp2_server_answers_as_tp1(model):
    log_dir = os.path.join(model["root"], "pp2")
    os.makedirs(log_dir)
    url, procs = start_server(model["ckpt"], ranks=2, extra=("--pipeline-model-parallel-size", "2"), log_dir=log_dir)
    try:
        _check_answers(url, model["reference"])
    finally:
        codes = stop_server(procs)
    assert codes == [0, 0]


MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: tools/setup_env.sh installs MPICH into .venv")
def test_an_mpiexec_tp2_server_lets_a_request_join_while_another_decodes(model):
    """mpiexec -n 2 (ranks from the MPI launcher, not torchrun's variables): a long greedy request decodes while
    a curl request joins the running batch; both answer exactly as tp = 1 alone; SIGTERM to mpiexec stops both
    ranks cleanly."""
    from megatron.inference import InferenceEngine, SamplingParams
    from tests.multirank import free_port

    engine = InferenceEngine.from_checkpoint(model["ckpt"])
    prompt = engine.tokenizer.tokenize("def")
    budget = engine.max_sequence_length - len(prompt)
    [long_alone] = engine.generate([prompt], [SamplingParams(max_new_tokens=budget, greedy=True)])
    assert long_alone.finish_reason == "length", "the long request must outlast the one that joins it"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    log_path = os.path.join(model["root"], "mpiexec_server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tools",
                                 "run_text_generation_server.py"), "--load", model["ckpt"], "--port", str(port),
                                 "--tensor-model-parallel-size", "2", "--no-request-log"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, log_path)
        long_request = {"prompt": prompt, "max_tokens": budget, "temperature": 0, "model": "ckpt"}
        reply = {}
        worker = threading.Thread(target=lambda: reply.update(_post(url + "/v1/completions", long_request)))
        worker.start()
        while worker.is_alive() and not _post(url + "/health", {}, method="GET")["running"]:
            time.sleep(0.01)  # a wait for the long request to start decoding, not a timing
        joined = _post(url + "/api", UPSTREAM, method="PUT")
        worker.join(timeout=600)
        health = _post(url + "/health", {}, method="GET")
        assert health["joined_running"] >= 1, f"the curl request did not join a running batch: {health}"
        assert joined["text"] == model["reference"]["upstream"]["text"]
        for ours, theirs in zip(joined["logprobs"], model["reference"]["upstream"]["logprobs"]):
            assert len(ours) == len(theirs) and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
        assert reply["choices"][0]["text"] == engine.tokenizer.detokenize(long_alone.tokens[len(prompt):])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    assert code == 0, open(log_path).read()[-3000:]
