"""Progress reporting: a redrawn bar on a terminal, a few plain log lines in a log file, one rank check."""

from __future__ import annotations

import io
import logging

import pytest

from covidscan.progress import LoggedProgress, progress
from covidscan.runtime import is_main_process, process_rank


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_stream_gets_a_few_plain_lines_and_no_carriage_returns(caplog):
    stream = io.StringIO()  # not a TTY, like a CI log or `covidscan train ... 2> train.log`
    with caplog.at_level(logging.INFO, logger="covidscan.progress"):
        items = list(progress(range(1000), desc="epoch 1/5", unit="batch", leave=True, stream=stream))
    assert items == list(range(1000))
    assert stream.getvalue() == ""  # nothing drawn
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4  # 25, 50, 75 and (leave=True) 100 %
    assert all("\r" not in line and line.startswith("epoch 1/5: ") for line in lines)
    assert lines[0].startswith("epoch 1/5: 250/1000 batch (25%)") and "1000/1000" in lines[-1]


def test_counted_progress_logs_one_line_per_milestone_however_big_the_steps(caplog):
    with (
        caplog.at_level(logging.INFO, logger="covidscan.progress"),
        progress(total=4, desc="predict", unit="img", stream=io.StringIO()) as bar,
    ):
        bar.update(3)  # crosses 25, 50 and 75 % at once
        bar.update(1)
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == ["predict: 3/4 img"]


def test_disabled_progress_is_silent_everywhere(caplog):
    with caplog.at_level(logging.INFO, logger="covidscan.progress"):
        assert list(progress([1, 2, 3], disable=True, leave=True, stream=io.StringIO())) == [1, 2, 3]
        assert list(progress([1, 2], disable=True, stream=Terminal())) == [1, 2]
    assert caplog.records == []


def test_a_terminal_gets_the_tqdm_bar():
    stream = Terminal()
    bar = progress(range(5), desc="epoch", stream=stream)
    assert not isinstance(bar, LoggedProgress)
    assert list(bar) == list(range(5))
    assert "\r" in stream.getvalue() and "epoch" in stream.getvalue()


class CountedIterable:
    """Counts how often it is iterated: a DataLoader starts workers and draws a seed each time."""

    def __init__(self, n: int) -> None:
        self.n, self.iterations = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        self.iterations += 1
        return iter(range(self.n))


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()], ids=["terminal", "log"])
def test_progress_iterates_its_iterable_exactly_once(stream):
    items = CountedIterable(3)
    assert list(progress(items, stream=stream)) == [0, 1, 2]
    assert items.iterations == 1  # tqdm.auto's asyncio bar would iterate it twice


def test_other_ranks_show_no_progress(monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    stream = Terminal()
    with caplog.at_level(logging.INFO, logger="covidscan.progress"):
        assert list(progress(range(8), leave=True, stream=stream)) == list(range(8))
    assert stream.getvalue() == "" and caplog.records == []


def test_one_rank_helper_reads_torchrun_and_the_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "5")  # ignored outside a multi-process run
    assert (process_rank(), is_main_process()) == (0, True)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (process_rank(), is_main_process()) == (5, False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # a joined group's rank wins
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert (process_rank(), is_main_process()) == (0, True)


@pytest.mark.parametrize("total", [None, 0])
def test_unknown_or_empty_totals_log_only_when_left(caplog, total):
    with caplog.at_level(logging.INFO, logger="covidscan.progress"):
        list(progress(iter(range(3)), total=total, desc="scan", leave=True, stream=io.StringIO()))
    assert len(caplog.records) == 1 and "\r" not in caplog.records[0].getMessage()
