"""The HTTP front end: a Starlette app, served by uvicorn in a thread of its own.

Routes (DESIGN.md, "serve"):

* ``POST /v1/predict`` (and ``/v1/models/NAME/predict``): ``{"inputs": [input0, …]}`` as nested
  lists with a leading batch dimension, in the model's input order, cast to the dtypes the model
  was profiled with; answered with ``{"outputs": [output0, …]}``. A safetensors body (tensors
  named ``input0`` …; content type ``application/octet-stream`` or ``application/x-safetensors``)
  gets a safetensors answer (``output0`` …) — no JSON round trip for large tensors.
* ``POST /v1/completions`` for causal language models (see :mod:`.completions`).
* ``GET /health`` (the process is up), ``GET /ready`` (every stage rank answered within the last
  few seconds; 503 otherwise), ``GET /metrics`` (Prometheus text), ``GET /v1/models``.
* ``POST /v1/admin/repartition``: a plan.json body; the switch happens between batches.

Every error is one JSON line ``{"error": "…"}``: 400 malformed, 401 missing or wrong bearer token
(when the server has one), 413 too large, 503 full queue or dead pipeline (with ``Retry-After``),
504 past the request's deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import time
from typing import Any

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeshift.errors import PipeshiftError
from pipeshift.plan import parse_plan
from pipeshift.serve.frontend import Frontend, Outcome, Request

_SAFETENSORS_TYPES = ("application/octet-stream", "application/x-safetensors", "application/safetensors")

try:  # optional (the ``serve`` extra): parses request bodies faster (benchmarks/bench_frontend.py)
    import orjson as _orjson
except ImportError:  # pragma: no cover - the extra is installed by the Makefile
    _orjson = None


# Every digit read as "0", so a run of 19 digits is one substring search (a regular expression
# for it cost more than orjson's whole parse of a 1024-float body).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def loads(body: bytes) -> Any:
    """A JSON body, parsed as :func:`json.loads` would: orjson when it is installed.

    orjson is strict JSON; what it refuses (``NaN``, bad bytes) goes to the standard library, so
    the result and the error messages do not depend on the extra. orjson reads an integer past
    64 bits as a float where the standard library keeps it exact (and the check of integer inputs
    then refuses it), so a body with 19 digits in a row takes the standard path too.
    """
    if _orjson is not None and _LONG_DIGITS not in body.translate(_DIGITS_AS_ZERO):
        try:
            return _orjson.loads(body)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(body)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``JSONResponse`` through orjson when installed (the stdlib encoder is the per-request cost).

    Starlette refuses non-finite floats (they are not JSON); orjson would write them as null, so
    content with a non-finite float takes the standard path and fails the same way there.
    """
    if _orjson is not None:
        try:
            data = _orjson.dumps(content)
        except TypeError:
            data = None
        if data is not None and b"null" not in data:
            return Response(data, status_code=status_code, headers=headers, media_type="application/json")
    return JSONResponse(content, status_code=status_code, headers=headers)


class HTTPError(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # an example, batch dimension first


@dataclasses.dataclass
class ModelInfo:
    name: str
    inputs: list[InputSpec]
    outputs: list[str]
    max_batch: int
    max_body_bytes: int
    request_timeout_s: float
    token: str | None = None
    completions: Any = None  # a completions.Generator for causal LMs

    def describe(self, frontend: Frontend) -> dict[str, Any]:
        example = {"inputs": [torch.zeros((1, *i.shape[1:]), dtype=i.dtype).tolist() for i in self.inputs]}
        return {"id": self.name, "object": "model",
                "inputs": [{"name": i.name, "dtype": str(i.dtype).removeprefix("torch."),
                            "example_shape": list(i.shape)} for i in self.inputs],
                "outputs": self.outputs, "max_batch": self.max_batch,
                "stages": [list(r) for r in frontend.routing.stage_ranks],
                "completions": self.completions is not None, "example": example}


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status, headers=headers)


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPError(413, f"the body is {declared} bytes; the limit is {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the body exceeds the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


@functools.lru_cache(maxsize=None)
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    # once per dtype: making the empty tensor was a tenth of the HTTP thread's time per request
    return torch.empty(0, dtype=dtype).numpy().dtype


def tensor_from_json(value: Any, spec: InputSpec) -> torch.Tensor:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise HTTPError(400, f"{spec.name} is not a rectangular array of numbers") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise HTTPError(400, f"{spec.name} is not a rectangular array of numbers")
    want = _numpy_dtype(spec.dtype)
    if want.kind in "iu" and arr.dtype.kind == "f":
        if arr.size and not np.all(np.isfinite(arr) & (np.floor(arr) == arr)):
            raise HTTPError(400, f"{spec.name} must hold integers ({spec.dtype})")
    return check_shape(torch.from_numpy(np.ascontiguousarray(arr.astype(want, copy=False))), spec)


def check_shape(t: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    if t.dim() != len(spec.shape):
        raise HTTPError(400, f"{spec.name}: expected {len(spec.shape)} dimensions (batch first, e.g. "
                             f"{list(spec.shape)}), got {list(t.shape)}")
    if t.shape[0] < 1:
        raise HTTPError(400, f"{spec.name}: the batch dimension is empty")
    return t


def parse_inputs(body: bytes, content_type: str, info: ModelInfo) -> tuple[list[torch.Tensor], bool]:
    """The request's tensors, and whether it came as safetensors (then the answer does too)."""
    binary = content_type.split(";")[0].strip().lower() in _SAFETENSORS_TYPES
    if binary:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            named = load(body)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise HTTPError(400, f"not a safetensors body ({e})") from None
        missing = [i.name for i in info.inputs if i.name not in named]
        extra = sorted(set(named) - {i.name for i in info.inputs})
        if missing or extra:
            raise HTTPError(400, f"the safetensors body must hold exactly {[i.name for i in info.inputs]}"
                                 f" (missing {missing}, unexpected {extra})")
        tensors = []
        for spec in info.inputs:
            t = named[spec.name]
            if t.dtype != spec.dtype:
                if t.dtype.is_floating_point and not spec.dtype.is_floating_point:
                    raise HTTPError(400, f"{spec.name} must be {spec.dtype}, got {t.dtype}")
                t = t.to(spec.dtype)
            tensors.append(check_shape(t, spec))
    else:
        try:
            doc = loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not JSON ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
            raise HTTPError(400, 'expected a JSON object {"inputs": [input0, …]}')
        if len(doc["inputs"]) != len(info.inputs):
            raise HTTPError(400, f"expected {len(info.inputs)} inputs {[i.name for i in info.inputs]}, "
                                 f"got {len(doc['inputs'])}")
        tensors = [tensor_from_json(v, spec) for v, spec in zip(doc["inputs"], info.inputs)]
    counts = {int(t.shape[0]) for t in tensors}
    if len(counts) != 1:
        raise HTTPError(400, f"the inputs disagree on the batch size: {[int(t.shape[0]) for t in tensors]}")
    n = counts.pop()
    if n > info.max_batch:
        raise HTTPError(413, f"{n} samples in one request; at most {info.max_batch} (--max-batch)")
    return tensors, binary


async def run_request(frontend: Frontend, tensors: list[torch.Tensor], timeout_s: float) -> Outcome:
    """Queue one request and wait for its one answer (504 past ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Outcome] = loop.create_future()

    def done(outcome: Outcome) -> None:
        try:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(outcome))
        except RuntimeError:  # the HTTP server's loop has closed (shutting down): nobody is waiting
            pass

    req = Request(tensors, timeout_s, done)
    frontend.submit(req)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout=timeout_s)
    except asyncio.TimeoutError:
        req.finish(Outcome(504, reason=f"no answer within {timeout_s:g} s (--request-timeout)"))
        return await fut


def answer(outcome: Outcome, binary: bool) -> Response:
    """A predict request's response: its outputs (as the request came: JSON or safetensors) or the error."""
    if outcome.status != 200:
        raise HTTPError(outcome.status, outcome.reason, outcome.headers)
    assert outcome.outputs is not None
    if binary:
        from safetensors.torch import save

        data = save({f"output{k}": t.contiguous() for k, t in enumerate(outcome.outputs)})
        return Response(data, media_type="application/octet-stream")
    return json_response({"outputs": [t.tolist() for t in outcome.outputs]})


def guarded(token: str | None, metrics):
    """The decorator every route goes through: the bearer token (when set), error answers, metrics."""
    def authorised(request: HTTPRequest) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def endpoint(name: str, *, auth: bool = True):
        def wrap(handler):
            async def run(request: HTTPRequest) -> Response:
                t0 = time.monotonic()
                try:
                    if auth and not authorised(request):
                        raise HTTPError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
                    response = await handler(request)
                except HTTPError as e:
                    response = error(e.status, e.reason, e.headers)
                metrics.answered(name, response.status_code, time.monotonic() - t0)
                return response
            return run
        return wrap
    return endpoint


def build_app(frontend: Frontend, info: ModelInfo, metrics) -> Starlette:
    endpoint = guarded(info.token, metrics)

    @endpoint("health", auth=False)
    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    @endpoint("ready", auth=False)
    async def ready(request: HTTPRequest) -> Response:
        now = time.monotonic()
        ranks = {str(r): {"seen_s_ago": round(now - frontend.last_seen[r], 3) if r in frontend.last_seen else None,
                          **{k: v for k, v in frontend.rank_info.get(r, {}).items() if k in ("stage", "pid")}}
                 for r in range(frontend.world_size)}
        body = {"ready": frontend.ready, "ranks": ranks}
        if frontend.dead:
            body["reason"] = frontend.dead
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @endpoint("metrics")
    async def metrics_route(request: HTTPRequest) -> Response:
        from pipeshift.serve.metrics import CONTENT_TYPE

        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @endpoint("models")
    async def models(request: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [info.describe(frontend)]})

    @endpoint("predict")
    async def predict(request: HTTPRequest) -> Response:
        name = request.path_params.get("name")
        if name is not None and name != info.name:
            raise HTTPError(404, f"no model named {name!r} (this server has {info.name!r})")
        body = await read_body(request, info.max_body_bytes)
        tensors, binary = parse_inputs(body, request.headers.get("content-type", "application/json"), info)
        return answer(await run_request(frontend, tensors, info.request_timeout_s), binary)

    @endpoint("completions")
    async def completions(request: HTTPRequest) -> Response:
        if info.completions is None:
            raise HTTPError(400, "this model is not a causal language model (one integer input of token ids, "
                                 "logits out): use /v1/predict")
        body = await read_body(request, info.max_body_bytes)
        return await info.completions.handle(body, lambda ids: run_request(frontend, [ids], info.request_timeout_s))

    @endpoint("repartition")
    async def repartition(request: HTTPRequest) -> Response:
        body = await read_body(request, info.max_body_bytes)
        try:
            plan = parse_plan(json.loads(body), "POST /v1/admin/repartition")
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not a plan.json ({e})") from None
        except PipeshiftError as e:
            raise HTTPError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str | None] = loop.create_future()
        frontend.switch_requests.put((plan, "POST /v1/admin/repartition",
                                      lambda err: loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))))
        try:
            err = await asyncio.wait_for(fut, timeout=4 * frontend.config.timeout_s + 10)
        except asyncio.TimeoutError:
            raise HTTPError(504, "the switch did not finish in time") from None
        if err is not None:
            raise HTTPError(400, err)
        return JSONResponse({"repartitioned": True, "stages": [list(r) for r in frontend.routing.stage_ranks],
                             "switch": frontend.switch_log[-1] if frontend.switch_log else None})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/admin/repartition", repartition, methods=["POST"]),
    ]
    return Starlette(routes=routes)
