"""Hugging Face models: `python -m benchmarks.bench_hf [--quick]`.

1. Wall-clock of ``pipeshift profile``, ``plan`` and ``codegen`` (whole processes, as a user runs
   them) on a GPT-2-small-shaped model built from its configuration (12 layers, 768 wide, 12
   heads, 50257 tokens, 124M parameters; random weights, no hub), batch 1 of 128 tokens, planned
   on 4 workers. ``--quick``: 4 layers.
2. The cost of keeping a tied weight tied: GPT-2 tiny (2 layers, 64 wide, 256 tokens) trained
   with ``flush`` on 2 local ranks, the head tied to the embedding across the two stages, against
   the same package with ``tied_parameters`` removed from conf.json (the copies then train apart,
   but the work is otherwise identical). Per-step time is the median of the rank-1 ``metrics.csv``
   step durations after the first; runs alternate tied/untied, and the ratio is tied / untied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, markdown_table

PY = sys.executable


def _run(argv: list[str], cwd: Path, timeout: float = 3600) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def _corpus(path: Path) -> Path:
    repo = Path(__file__).resolve().parents[1]
    path.write_text("\n".join((repo / n).read_text() for n in ("README.md", "CONTRIBUTING.md")) * 4)
    return path


def steps_workflow(work: Path, layers: int) -> list[list[str]]:
    from transformers import GPT2Config

    GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
               bos_token_id=0, eos_token_id=0).save_pretrained(work / "gpt2-small")
    text = _corpus(work / "corpus.txt")
    m = ["pipeshift.hf:auto", "--model-arg", f"path={work / 'gpt2-small'}"]
    d = ["--data", "pipeshift.data:text_file", "--data-arg", f"path={text}", "--data-arg", "seq_len=128"]
    rows = []
    for step, argv in [
        ("profile", [*m, *d, "--loss", "pipeshift.losses:causal_lm", "-b", "1", "-o", "prof", "--quiet",
                     "--iterations", "3", "--warmup", "1"]),
        ("plan", ["prof/graph.txt", "-n", "4", "-o", "plan"]),
        ("codegen", ["plan", "-o", "stages"]),
    ]:
        seconds = _run([PY, "-m", "pipeshift", step, *argv], work)
        rows.append([step, f"{seconds:.1f}", f"pipeshift {step} {' '.join(argv)}"])
    nodes = len(json.loads((work / "prof" / "profile.json").read_text())["nodes"])
    return [[*r[:2], str(nodes), r[2]] for r in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(pkg: Path, out: Path, text: Path, steps: int) -> list[float]:
    port = _free_port()
    procs = [subprocess.Popen([PY, "-m", "pipeshift", "train", str(pkg), "--rank", str(r), "--world-size", "2",
                               "--dist-addr", f"127.0.0.1:{port}", "--threads", "1", "--no-progress",
                               "--output-dir", str(out), "--steps", str(steps), "--microbatches", "4",
                               "--batch-size", "8", "--data", "pipeshift.data:text_file",
                               "--data-arg", f"path={text}", "--data-arg", "seq_len=32", "--trace-steps", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"train failed:\n{err[-2000:]}")
    with open(out / "rank1" / "metrics.csv") as f:
        times = [float(r["time_s"]) for r in csv.DictReader(f) if r["split"] == "train"]
    return [b - a for a, b in zip(times, times[1:])]


def tie_overhead(work: Path, steps: int, repeats: int) -> list[list[str]]:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0,
               eos_token_id=0).save_pretrained(work / "gpt2-tiny")
    text = _corpus(work / "corpus-tiny.txt")
    spec = ["pipeshift.hf:auto", "--model-arg", f"path={work / 'gpt2-tiny'}"]
    _run([PY, "-m", "pipeshift", "profile", *spec, "--data", "pipeshift.data:text_file", "--data-arg", f"path={text}",
          "--data-arg", "seq_len=32", "-b", "8", "-o", "tprof", "--quiet", "--iterations", "2"], work)
    _run([PY, "-m", "pipeshift", "plan", "tprof/graph.txt", "-n", "2", "--straight-pipeline", "-o", "tplan"], work)
    _run([PY, "-m", "pipeshift", "codegen", "tplan", "-o", "tied"], work)
    shutil.copytree(work / "tied", work / "untied")
    conf = json.loads((work / "untied" / "conf.json").read_text())
    assert conf.pop("tied_parameters"), "the 2-stage GPT-2 plan should tie the head to the embedding"
    (work / "untied" / "conf.json").write_text(json.dumps(conf))
    per = {"tied": [], "untied": []}
    for i in range(repeats):
        for kind in ("tied", "untied"):
            per[kind].append(statistics.median(_train(work / kind, work / f"out-{kind}-{i}", text, steps)))
    tied, untied = statistics.median(per["tied"]), statistics.median(per["untied"])
    cmd = (f"pipeshift train STAGES --rank R --world-size 2 --steps {steps} --microbatches 4 --batch-size 8 "
           "--data pipeshift.data:text_file --data-arg seq_len=32 (2 ranks, GPT-2 tiny)")
    return [["tied", f"{tied * 1e3:.1f}", f"{min(per['tied']) * 1e3:.1f}–{max(per['tied']) * 1e3:.1f}", cmd],
            ["untied", f"{untied * 1e3:.1f}", f"{min(per['untied']) * 1e3:.1f}–{max(per['untied']) * 1e3:.1f}", cmd],
            ["ratio tied / untied", f"{tied / untied:.3f}", "", ""]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"load average before: {load_average()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        layers = 4 if args.quick else 12
        print(f"### profile, plan, codegen of a GPT-2-small-shaped model ({layers} layers, 768 wide)\n")
        print(markdown_table(["step", "wall s", "graph nodes", "command"],
                             steps_workflow(work, layers), right=[1, 2]))
        print("\n### tie all-reduce overhead per step (GPT-2 tiny, flush, 2 local ranks)\n")
        print(markdown_table(["run", "median step ms", "range of repeats", "command"],
                             tie_overhead(work, 10 if args.quick else 30, 2 if args.quick else 3), right=[1]))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
