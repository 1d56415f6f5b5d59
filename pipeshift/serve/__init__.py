"""Serving a stage package: ``pipeshift serve STAGES --local N`` (DESIGN.md, "serve").

The stages stay torch.distributed ranks, as in training; one of them (rank 0, or
``--frontend-rank``) also runs the HTTP front end. Pieces, one idea each:

* :mod:`.wire` — messages between ranks: a small fixed-size header (kind, batch, every tensor's
  dtype and shape) then one flat payload, so batch sizes and sequence lengths change freely;
  deadlines on every wait; a local mailbox where a rank talks to itself.
* :mod:`.routing` — from the package's names alone: what each stage receives from whom, what it
  sends on, which tensors are the model's outputs.
* :mod:`.worker` — a stage rank's loop: control messages in order (a batch, a ping, a switch,
  stop), receive, forward, send on.
* :mod:`.tp` — a tensor-parallel stage's group: sharded as in training, its leader shares each
  batch's inputs with the rest of the group, which computes with it.
* :mod:`.frontend` — the admission queue, the batcher, keeping several batches in flight, the
  collector that answers requests, liveness, and repartitioning between batches.
* :mod:`.http` — the Starlette app (predict, completions, health, ready, metrics, models).
* :mod:`.metrics` — the Prometheus registry.
* :mod:`.cli`, :mod:`.loadtest` — the commands.

Nothing under :mod:`pipeshift.runtime` imports this package.
"""
