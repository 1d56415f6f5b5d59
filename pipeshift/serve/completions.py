"""``POST /v1/completions`` for causal language models (a subset of OpenAI's API).

Request: ``{"prompt": "text" | [token ids], "max_tokens": 16, "temperature": 0.0, "stream": false,
"seed": 0}``; text needs the model directory's tokenizer (``tokenizer.json`` … beside
``config.json``). Answer: ``{"id", "object": "text_completion", "created", "model", "choices":
[{"index": 0, "text", "token_ids", "finish_reason"}], "usage"}``; with ``"stream": true``
server-sent events, one ``data: {…}`` per token, then ``data: [DONE]``.

Generation is by **recomputation**: every new token is one ordinary request through the
admission queue, the batcher and the pipeline, on the whole sequence so far (batched with any
other request of the same length). The stages hold no per-request state, so repartitioning and
replicas need nothing special — at the cost of quadratic work per sequence. The response says
so in ``X-Pipeshift-Generation: recompute``. Temperature 0 is greedy (argmax); otherwise
sampling from ``softmax(logits / temperature)`` with a generator seeded by ``seed``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from starlette.responses import JSONResponse, Response, StreamingResponse

from pipeshift.serve.frontend import Outcome
from pipeshift.serve.http import HTTPError

GENERATION_HEADER = {"X-Pipeshift-Generation": "recompute"}


def causal_lm(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """One integer input (batch, tokens) and logits (batch, tokens, vocab) out."""
    return (len(inputs) == 1 and len(outputs) >= 1 and not inputs[0].dtype.is_floating_point
            and inputs[0].dim() == 2 and outputs[0].dim() == 3 and outputs[0].shape[:2] == inputs[0].shape)


def load_tokenizer(spec_kwargs: dict[str, Any]) -> Any:
    """The tokenizer of a Hugging Face model directory (``path=DIR``), or None."""
    path = spec_kwargs.get("path")
    if not isinstance(path, str) or not Path(path).is_dir():
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((Path(path) / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class Generator:
    def __init__(self, name: str, vocab: int, max_context: int, max_new_tokens: int, tokenizer: Any = None):
        self.name, self.vocab, self.max_context = name, vocab, max_context
        self.max_new_tokens, self.tokenizer = max_new_tokens, tokenizer

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise HTTPError(400, 'expected a JSON object {"prompt": …}')
        prompt = doc.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise HTTPError(400, "this model has no tokenizer (no tokenizer files beside its config): "
                                     "send the prompt as a list of token ids")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = list(prompt)
        else:
            raise HTTPError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)")
        if not ids:
            raise HTTPError(400, "the prompt encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise HTTPError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        max_tokens = doc.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= self.max_new_tokens:
            raise HTTPError(400, f"max_tokens must be an integer in 1..{self.max_new_tokens}")
        if len(ids) + max_tokens > self.max_context:
            raise HTTPError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.max_context} tokens")
        temperature = doc.get("temperature", 0.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 100:
            raise HTTPError(400, "temperature must be a number in 0..100")
        seed = doc.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise HTTPError(400, "seed must be an integer")
        stream = doc.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPError(400, "stream must be true or false")
        return {"ids": ids, "max_tokens": max_tokens, "temperature": float(temperature), "seed": seed,
                "stream": stream}

    async def _tokens(self, req: dict[str, Any], forward: Callable[[torch.Tensor], Awaitable[Outcome]]
                      ) -> AsyncIterator[tuple[int, str | None]]:
        ids = list(req["ids"])
        gen = torch.Generator().manual_seed(req["seed"])
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        for k in range(req["max_tokens"]):
            outcome = await forward(torch.tensor([ids], dtype=torch.int64))
            if outcome.status != 200 or not outcome.outputs:
                raise HTTPError(outcome.status, outcome.reason, outcome.headers)
            logits = outcome.outputs[0][0, -1].double()
            if req["temperature"] == 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / req["temperature"], dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(token)
            finish = "stop" if eos is not None and token == eos else ("length" if k == req["max_tokens"] - 1 else None)
            yield token, finish
            if finish:
                return

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else ""

    async def handle(self, body: bytes, forward: Callable[[torch.Tensor], Awaitable[Outcome]]) -> Response:
        req = self._parse(body)
        cid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())

        def chunk(text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": self.name,
                    "choices": [{"index": 0, "text": text, "token_ids": tokens, "finish_reason": finish}]}

        if not req["stream"]:
            tokens, finish = [], None
            async for token, reason in self._tokens(req, forward):
                tokens.append(token)
                finish = reason
            body_out = chunk(self._text(tokens), tokens, finish)
            body_out["usage"] = {"prompt_tokens": len(req["ids"]), "completion_tokens": len(tokens),
                                 "total_tokens": len(req["ids"]) + len(tokens)}
            return JSONResponse(body_out, headers=GENERATION_HEADER)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for token, finish in self._tokens(req, forward):
                    yield f"data: {json.dumps(chunk(self._text([token]), [token], finish))}\n\n".encode()
            except HTTPError as e:
                yield f"data: {json.dumps({'error': e.reason, 'status': e.status})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**GENERATION_HEADER, "Cache-Control": "no-cache"})
