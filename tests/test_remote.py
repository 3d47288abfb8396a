"""`remote.in_task`: a function that reads a whole split runs in a one-shot Ray task."""

from __future__ import annotations

import os

import pytest

from posmine.io.inputs import DataError
from posmine.stages import remote


def _pid_and(x: int) -> tuple[int, int]:
    return os.getpid(), x * 2


def _fails(where: str) -> None:
    raise DataError(f"{where}: query id 'q9' is not in the queries file")


def test_runs_in_another_process_and_returns_the_result(ray_local: None) -> None:
    pid, value = remote.in_task(_pid_and, 21)
    assert value == 42 and pid != os.getpid()
    assert remote.in_task(_pid_and, 1)[0] != pid  # one-shot: the worker left with its memory


def test_the_task_error_comes_back_as_raised(ray_local: None) -> None:
    with pytest.raises(DataError, match=r"^qrels/train.tsv:7: query id 'q9'") as e:
        remote.in_task(_fails, "qrels/train.tsv:7")
    assert type(e.value) is DataError  # not Ray's wrapper: the CLI prints it as ours
