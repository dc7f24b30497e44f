"""The text generation server: upstream's `PUT /api` and an OpenAI-compatible API over one InferenceEngine, on
every rank of the model's layout.

    engine = InferenceEngine.from_checkpoint(load, tp=2, pp=1)     # on every rank
    serve(engine, host="127.0.0.1", port=5000)                     # rank 0: HTTP; the others: follow rank 0

How a request travels (rank 0):
  1. the endpoint (an asyncio coroutine) validates the body (api_upstream.py / api_openai.py), tokenizes, and
     hands a Job (token ids + SamplingParams per sequence) to the Scheduler; it awaits the Job's future;
  2. the Scheduler's one thread runs the engine's RunningBatch (continuous batching, inference/batching.py):
     before each decode step it takes queued sequences into the free slots (up to `max_batch_size` running),
     broadcasts ("step", joins, leaves) to the other ranks (torch.distributed.broadcast_object_list over the
     world group), and every rank runs the same step; a request that comes while others decode joins at the
     next step, and a row leaves at the step it finishes;
  3. each Job's future gets its results once all its sequences are done; streamed tokens reach the endpoint
     through `on_token` as they come.
A sequence that fails (its request is invalid, its draw raised) ends its own Job only. Beam search runs alone,
between batches. While idle, rank 0 broadcasts a no-op every `heartbeat_s`, so a follower waiting for work never
reaches the process group's timeout.

Shutdown (SIGTERM or SIGINT on rank 0): uvicorn stops accepting connections and waits for the requests in flight;
then the Scheduler finishes every queued and running Job, broadcasts ("stop",), and every rank returns from `serve`. A
follower ignores SIGTERM (torchrun forwards it to every rank) and waits for rank 0's stop.

Why FastAPI on uvicorn (upstream uses Flask): request bodies validated by pydantic models that name the field at
fault, server-sent events for `stream` through StreamingResponse without extra packages, asyncio endpoints that
wait on the engine without a thread each, and uvicorn's graceful shutdown on SIGTERM (stop accepting, drain).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.distributed as dist
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from megatron.inference import api_openai as oai
from megatron.inference import api_upstream as up
from megatron.inference.engine import SamplingParams
from megatron.errors import MegatronError
from megatron.inference.request_error import RequestError
from megatron.inference.batching import Request as BatchRequest


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    upstream_defaults: up.UpstreamDefaults = field(default_factory=up.UpstreamDefaults)
    max_new_tokens: int = 1024          # --out-seq-length: the most new tokens one sequence may ask for
    max_tokens_to_oom: Optional[int] = 12000  # upstream's --max-tokens-to-oom for PUT /api
    heartbeat_s: float = 60.0
    batch_wait_s: float = 0.025        # --batch-wait-ms
    log_requests: bool = True


@dataclass
class Job:
    kind: str                                  # "generate" (continuous batching) or "beam_search" (a call alone)
    prompts: list
    params: list = field(default_factory=list)
    call_args: dict = field(default_factory=dict)   # beam_search's other arguments, in order
    on_token: Optional[Callable[[int, int], None]] = None   # (sequence index in this job, token id)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    # the scheduler's bookkeeping of a generate Job: sequences sent to the batch, results, sequences still out
    joined: int = 0
    results: list = field(default_factory=list)
    remaining: int = 0


class Scheduler:
    """One thread on rank 0 that owns every engine call and tells the followers each one first.

    Generate Jobs run in the engine's RunningBatch (continuous batching, inference/batching.py): before every
    decode step the thread takes queued sequences, first come first served, into the batch's free slots (a Job
    with more sequences than the batch holds joins as rows free up), and sends the step's joins and leaves to
    the other ranks; rows that finish leave at that step and their Job is answered once all its sequences are
    done. A sequence that fails ends its Job with that error; the Job's other sequences leave at the next step,
    and no other request is touched. Beam search runs alone, once the running batch has drained (Jobs behind it
    wait, so no request overtakes an earlier one)."""

    def __init__(self, engine, max_batch_size: int, heartbeat_s: float = 60.0, start: bool = True,
                 batch_wait_s: float = 0.0):
        """max_batch_size: the most sequences running at once (at most the engine's max_batch_size);
        batch_wait_s: how long an idle batch waits, once a request has come, for others sent at the same time
        (until max_batch_size sequences are queued), so they share one prefill; start=False: the thread starts
        at `start()` (what is queued before then joins the first step)."""
        self.engine = engine
        self.max_batch_size = min(max_batch_size, engine.max_batch_size)
        self.heartbeat_s = heartbeat_s
        self.batch_wait_s = batch_wait_s
        self.multi_rank = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.batch = engine.running_batch()
        self._pending: collections.deque[Job] = collections.deque()
        self._owners: dict = {}                # request id in the batch -> (Job, sequence index)
        self._leaving: list = []               # request ids of failed Jobs still in the batch
        self._next_id = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._cancelled: list[Job] = []        # Jobs whose clients went away (cancel)
        self.steps_run = 0              # decode steps (for tests and /health)
        self.largest_batch = 0          # the most rows one step ran
        self.joined_running = 0         # sequences that joined a batch already running (continuous batching)
        self.in_flight = 0              # submitted Jobs not answered yet
        self._thread = threading.Thread(target=self._loop, name="megatron-scheduler", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        if job.kind == "generate":
            job.results, job.remaining = [None] * len(job.prompts), len(job.prompts)
        with self._cv:
            if self._stopping:
                raise RequestError("the server is shutting down", status=503)
            self._pending.append(job)
            self.in_flight += 1
            self._cv.notify()
        job.future.add_done_callback(self._finished)
        return job.future

    def _finished(self, _future) -> None:
        with self._cv:
            self.in_flight -= 1

    def cancel(self, job: Job) -> None:
        """Stop `job` (its client went away): its queued sequences never join and its running ones leave at the
        next step; its future fails. Only the scheduler's thread answers futures, so this only asks."""
        with self._cv:
            self._cancelled.append(job)
            self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self.batch.active

    def stop(self) -> None:
        """Finish every queued and running Job, tell the followers to stop, and end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    # ---- the thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                work = self._next_work()
                if work is None:
                    break
                if isinstance(work, Job):
                    self._run_alone(work)
                else:
                    self._step(*work)
        finally:
            if self.multi_rank:
                self._broadcast(("stop",))

    def _next_work(self):
        """None (stop), a Job to run alone, or the next step's (joins, leaves)."""
        with self._cv:
            if not self.batch.active:
                while not self._pending and not self._stopping:
                    if not self._cv.wait(timeout=self.heartbeat_s) and self.multi_rank and not self._pending:
                        self._broadcast(("noop",))
                if not self._pending:
                    return None
                if self._pending[0].kind == "generate" and self.batch_wait_s > 0:
                    # clients that send together arrive a few milliseconds apart: one prefill for them all
                    deadline = time.monotonic() + self.batch_wait_s
                    while not self._stopping and self._queued_sequences() < self.max_batch_size:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cv.wait(timeout=remaining)
                if self._pending[0].kind != "generate":
                    return self._pending.popleft()
            for job in self._cancelled:
                if not job.future.done():
                    job.future.set_exception(RequestError("cancelled: the client went away", status=499))
                    self._leaving += [rid for rid, (other, _) in self._owners.items() if other is job]
            self._cancelled = []
            joins = []
            free = self.max_batch_size - self.batch.active
            while self._pending and self._pending[0].kind == "generate" and free > len(joins):
                job = self._pending[0]
                if job.future.done():  # failed while some of its sequences were still queued
                    self._pending.popleft()
                    continue
                index = job.joined
                job.joined += 1
                if job.joined == len(job.prompts):
                    self._pending.popleft()
                request_id = self._next_id
                self._next_id += 1
                self._owners[request_id] = (job, index)
                joins.append(BatchRequest(request_id, job.prompts[index], job.params[index],
                                     self._callback(job, index)))
            leaves, self._leaving = self._leaving, []
            return joins, leaves

    def _queued_sequences(self) -> int:
        return sum(len(job.prompts) - job.joined for job in self._pending if job.kind == "generate")

    @staticmethod
    def _callback(job: Job, index: int):
        if job.on_token is None:
            return None

        def on_token(token):
            try:
                job.on_token(index, token)
            except Exception:  # noqa: BLE001 - a client's callback never stops the batch
                pass
        return on_token

    def _broadcast(self, command: tuple) -> None:
        if self.multi_rank:
            dist.broadcast_object_list([command], src=0)

    def _step(self, joins: list, leaves: list) -> None:
        if joins and self.batch.active:
            self.joined_running += len(joins)
        self._broadcast(("step", [(r.id, r.prompt, r.params) for r in joins], leaves))
        try:
            finished = self.batch.step(joins, leaves)
        except Exception as error:  # noqa: BLE001 - the engine failed as a whole: the Jobs in it get the error
            self._broadcast(("reset",))
            self.batch = self.engine.running_batch()
            for job, _ in list(self._owners.values()):
                if not job.future.done():
                    job.future.set_exception(error)
            self._owners.clear()
            return
        self.steps_run += 1
        self.largest_batch = max(self.largest_batch, self.batch.rows_sampled)
        for done in finished:
            job, index = self._owners.pop(done.id)
            if done.error is not None:
                if not job.future.done():
                    job.future.set_exception(done.error)
                    self._leaving += [rid for rid, (other, _) in self._owners.items() if other is job]
                continue
            job.results[index] = done.result
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(job.results)

    def _run_alone(self, job: Job) -> None:
        try:
            args = (*job.prompts, *job.call_args.values())
            self._broadcast((job.kind, args))
            job.future.set_result(self.engine.beam_search(*args))
        except Exception as error:  # noqa: BLE001 - one request's failure is its reply, not the server's end
            job.future.set_exception(error)


def follow(engine) -> None:
    """A rank other than 0: make the engine calls rank 0 announces (the running batch's steps, beam searches),
    until it says stop."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # the drain is rank 0's to lead
    batch = engine.running_batch()
    try:
        while True:
            command = [None]
            dist.broadcast_object_list(command, src=0)
            name, args = command[0][0], command[0][1:]
            if name == "stop":
                return
            if name == "noop":
                continue
            if name == "reset":
                batch = engine.running_batch()
                continue
            try:
                if name == "step":
                    joins, leaves = args
                    batch.step([BatchRequest(*join) for join in joins], leaves)
                else:
                    engine.beam_search(*args[0])
            except Exception as error:  # noqa: BLE001 - rank 0 meets the same error and answers the request
                print(f"rank {dist.get_rank()}: {name} failed: {error}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- the HTTP side


def _error_response(error: RequestError, openai_style: bool):
    if openai_style:
        return JSONResponse({"error": {"message": error.message, "type": "invalid_request_error",
                                       "param": error.field, "code": None}}, status_code=error.status)
    return JSONResponse(error.message, status_code=error.status)  # upstream's reply: the message as a JSON string


def _as_request_error(error: MegatronError) -> RequestError:
    """A refusal from below (the engine's GenerationError, a tokenizer's) is the request's fault: 400."""
    return error if isinstance(error, RequestError) else RequestError(str(error))


async def _json_body(request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"body: the request body is not valid JSON ({error})", field="body") from None


def build_app(engine, scheduler: Scheduler, settings: ServerSettings, on_ready: Optional[Callable[[], None]] = None):
    """The FastAPI application of rank 0; on_ready() runs once it accepts requests."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="Megatron text generation server", lifespan=lifespan)
    tokenizer = engine.tokenizer
    model_name = engine.model_name
    created = int(time.time())

    async def run_job(job: Job):
        scheduler.submit(job)
        return await asyncio.wrap_future(job.future)

    def log(request: Request, body) -> None:
        if settings.log_requests:
            print("request IP: " + str(request.client.host if request.client else None))
            print(json.dumps(body), flush=True)
            print("start time: ", datetime.datetime.now(), flush=True)

    @app.put("/api")
    async def upstream_api(request: Request):
        try:
            body = await _json_body(request)
            req = up.parse_upstream_request(body, settings.upstream_defaults)
            if req.tokens_to_generate > settings.max_new_tokens:
                raise RequestError(f"tokens_to_generate: {req.tokens_to_generate} is more than the server's "
                                   f"--out-seq-length {settings.max_new_tokens}", field="tokens_to_generate")
            if not req.no_log:
                log(request, body)
            prompts = up.tokenize_prompts(req, tokenizer)
            padded = up.check_lengths(req, prompts, engine.max_sequence_length, settings.max_tokens_to_oom)
            if req.beam_width is not None:
                stop_token = tokenizer.eod if req.stop_token is None else req.stop_token
                job = Job("beam_search", prompts, call_args=dict(
                    beam_width=req.beam_width, max_new_tokens=req.tokens_to_generate, stop_token=stop_token,
                    length_penalty=req.length_penalty, num_return_gen=req.beam_width,  # the whole beam, as upstream
                    prevent_newline_after_colon=req.prevent_newline_after_colon))
                sequences, scores = await run_job(job)
                reply = up.upstream_beam_reply(sequences, scores, tokenizer)
            else:
                results = await run_job(Job("generate", prompts, up.sampling_params(req, prompts, padded)))
                reply = up.upstream_reply(req, results, tokenizer)
            if not req.no_log and settings.log_requests:
                print("end time: ", datetime.datetime.now(), flush=True)
            return JSONResponse(reply)
        except MegatronError as error:
            return _error_response(_as_request_error(error), openai_style=False)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await _json_body(request)
            req = oai.parse_request(oai.CompletionRequest, body)
            oai.check_model(req.model, model_name)
            if req.stream and req.logprobs is not None:
                raise RequestError("logprobs: not available with stream; ask without stream", field="logprobs")
            prompts = oai.completion_prompts(req, tokenizer, engine.vocab_size)
            budget = oai.new_token_budget(req.max_tokens, prompts, engine.max_sequence_length,
                                          settings.max_new_tokens)
            _check_budget(budget, "max_tokens", settings)
            oai.check_context(prompts, budget, engine.max_sequence_length, "max_tokens")
            if budget == 0 and not req.echo:
                raise RequestError("max_tokens: 0 generates nothing; ask with echo true to score the prompt",
                                   field="max_tokens")
            all_prompts = [p for p in prompts for _ in range(req.n)]
            params = [sp for _ in prompts for sp in oai.sampling_params(req, budget, req.logprobs)]
            if req.stream:
                return _stream(all_prompts, params, req, "text_completion")
            results = await run_job(Job("generate", all_prompts, params))
            choices = [oai.completion_choice(i, r, req, tokenizer) for i, r in enumerate(results)]
            return JSONResponse(oai.completion_reply(model_name, choices, oai.usage(results, results[::req.n])))
        except MegatronError as error:
            return _error_response(_as_request_error(error), openai_style=True)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await _json_body(request)
            req = oai.parse_request(oai.ChatRequest, body)
            oai.check_model(req.model, model_name)
            prompt = oai.chat_prompt(req, tokenizer)
            name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            budget = oai.new_token_budget(asked, [prompt], engine.max_sequence_length, settings.max_new_tokens)
            _check_budget(budget, name, settings)
            oai.check_context([prompt], budget, engine.max_sequence_length, name)
            params = oai.sampling_params(req, budget)
            if req.stream:
                return _stream([prompt] * req.n, params, req, "chat.completion.chunk")
            results = await run_job(Job("generate", [prompt] * req.n, params))
            choices = [oai.chat_choice(i, r, req, tokenizer) for i, r in enumerate(results)]
            return JSONResponse(oai.chat_reply(model_name, choices, oai.usage(results, results[:1])))
        except MegatronError as error:
            return _error_response(_as_request_error(error), openai_style=True)

    def _check_budget(budget: int, name: str, settings_: ServerSettings) -> None:
        if budget > settings_.max_new_tokens:
            raise RequestError(f"{name}: {budget} is more than the server's --out-seq-length "
                               f"{settings_.max_new_tokens}", field=name)

    def _stream(prompts, params: list[SamplingParams], req, kind: str):
        """Server-sent events: one chunk per text delta of a choice, a last chunk with its finish_reason,
        then `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        streams = [oai.StreamText(tokenizer, oai.stop_strings(req)) for _ in prompts]
        job = Job("generate", prompts, params,
                  on_token=lambda i, token: loop.call_soon_threadsafe(events.put_nowait, ("token", i, token)))
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f, None)))
        ident = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
        created_at = int(time.time())

        def chunk(index: int, text: Optional[str], finish: Optional[str], role: bool = False) -> str:
            if kind == "text_completion":
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            else:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": ident, "object": kind, "created": created_at, "model": model_name,
                                          "choices": [choice]}) + "\n\n"

        async def events_out():
            try:
                scheduler.submit(job)
            except RequestError as error:
                yield "data: " + json.dumps({"error": {"message": error.message}}) + "\n\n"
                return
            try:
                async for event in stream_events():
                    yield event
            finally:  # the client went away (the generator is closed): its sequences leave the running batch
                if not job.future.done():
                    scheduler.cancel(job)

        async def stream_events():
            for i, prompt in enumerate(prompts):
                if kind != "text_completion":
                    yield chunk(i, None, None, role=True)
                elif getattr(req, "echo", False):
                    yield chunk(i, tokenizer.detokenize(prompt), None)
            while True:
                what, a, b = await events.get()
                if what == "token":
                    delta = streams[a].push(b)
                    if delta:
                        yield chunk(a, delta, None)
                    continue
                if a.exception() is not None:
                    yield "data: " + json.dumps({"error": {"message": str(a.exception())}}) + "\n\n"
                    break
                for i, result in enumerate(a.result()):
                    generated = result.tokens[result.prompt_length:]
                    while len(streams[i].tokens) < len(generated):  # tokens the callback did not deliver
                        delta = streams[i].push(generated[len(streams[i].tokens)])
                        if delta:
                            yield chunk(i, delta, None)
                    tail = streams[i].flush()
                    if tail:
                        yield chunk(i, tail, None)
                    yield chunk(i, None, "stop" if streams[i].finished else result.finish_reason)
                break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events_out(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return JSONResponse(oai.models_reply(model_name, created))

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok", "model": model_name, "queued": scheduler.queued,
                             "in_flight": scheduler.in_flight, "running": scheduler.running,
                             "steps": scheduler.steps_run, "largest_batch": scheduler.largest_batch,
                             "joined_running": scheduler.joined_running})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # the server never dies on a request
        return JSONResponse({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error"}},
                            status_code=500)

    return app


def serve(engine, settings: ServerSettings, max_batch_size: int, on_ready: Optional[Callable[[], None]] = None):
    """Run the server on this rank: HTTP on rank 0 until SIGTERM/SIGINT, following rank 0 elsewhere."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank != 0:
        follow(engine)
        return
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's graceful shutdown on SIGTERM/SIGINT, without raising the signal again once drained (uvicorn
        0.29+ does, which would kill this process before it tells the other ranks to stop)."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for the requests in flight
            self.should_exit = True

    scheduler = Scheduler(engine, max_batch_size, settings.heartbeat_s, batch_wait_s=settings.batch_wait_s)
    app = build_app(engine, scheduler, settings, on_ready)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    server = DrainingServer(config)
    try:
        server.run()
    finally:
        scheduler.stop()
