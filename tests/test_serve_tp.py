"""Serving tensor-parallel stages sharded: ``pipeshift serve`` on 2 stages × TP 2 (4 ranks).

The tiny Hugging Face Llama of the TP tests, its layers sharded by ``LlamaConfig``'s own plan
on both stages (and the head column-parallel, gathered). Rank 0 is both the front end and the
leader of stage 0's TP group; stage 1's group receives activations through its leader and
returns the outputs from it. Answers equal the unsplit model's forward, computed here, for
concurrent requests of several batch sizes and sequence lengths; every rank's log says what it
sharded. One server launch; a hard timeout.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import tp_helpers as H
from helpers import REPO
from pipeshift.spec import ModelSpec
from serve_helpers import Server, assert_close, assert_concurrent_predictions_equal

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tp")
    H.install_llama_module(root / "mods")
    pkg = H.write_llama_package(root / "stages", [1], [[0, 1], [2, 3]], tp={0: 2, 1: 2})
    path = os.pathsep.join([str(REPO), str(root / "mods")])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", path)
        mp.syspath_prepend(str(root / "mods"))
        server = Server(root, pkg, 4, ["--max-batch", "4", "--timeout", "120"], start_timeout=600.0)
        try:
            yield server, ModelSpec.from_json({**H.LLAMA_SPEC, "kwargs": {"layers": 2}}).build().model.eval()
        finally:
            server.close()
    sys.modules.pop("tp_test_llama", None)


def tokens(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def test_tp_stages_served_sharded_equal_the_unsplit_model(served) -> None:
    server, model = served
    log = server.log()
    # both groups' leaders report their shards: 2 layers' 7 projections, the head on the last stage
    assert "stage 0 replica 0 runs on TP group [0, 1] (degree 2): sharded 7 modules" in log, log[-3000:]
    assert "stage 1 replica 0 runs on TP group [2, 3] (degree 2): sharded 8 modules" in log, log[-3000:]
    cases = [(1 + i % 4, (5, 8)[i % 2], 300 + i) for i in range(10)]
    assert_concurrent_predictions_equal(server, model, tokens, cases, tol=1e-5)
    # a batch the model rejects (a token outside the vocabulary) is answered, and the group stays in step
    bad = server.predict(torch.full((1, 4), 10_000))
    assert bad.status_code == 400 and "stage 0" in bad.text, bad.text
    again = server.predict(tokens(2, 6, 7))
    assert again.status_code == 200, again.text
    with torch.no_grad():
        assert_close(again.json()["outputs"][0], model(tokens(2, 6, 7)), tol=1e-5)
