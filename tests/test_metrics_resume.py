"""A resumed run's metrics.csv keeps one row per step: the rows after the checkpoint are dropped."""

from __future__ import annotations

import csv

from pipeshift.runtime.metrics import MetricsLog


def _steps(path) -> list[tuple[str, int]]:
    return [(r["split"], int(r["step"])) for r in csv.DictReader(open(path))]


def test_resume_truncates_to_the_checkpoint_step(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(1, 7):  # the first run got to step 6; its last checkpoint was step 4
        log.row(step=step, split="train", loss=1.0 / step)
    log.row(step=4, split="val", loss=0.5)
    log.close()
    resumed = MetricsLog(path, append=True, upto_step=4)
    for step in (5, 6, 7):
        resumed.row(step=step, split="train", loss=0.1)
    resumed.close()
    assert _steps(path) == [("train", 1), ("train", 2), ("train", 3), ("train", 4), ("val", 4),
                            ("train", 5), ("train", 6), ("train", 7)]


def test_a_file_of_another_format_is_started_afresh(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("something,else\n1,2\n")
    MetricsLog(path, append=True, upto_step=3).close()
    assert path.read_text().splitlines()[0].startswith("step,split,stage,rank")
