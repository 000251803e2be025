"""progress.Progress outside a terminal: plain lines with the count and the time left."""
import time

import progress


def test_plain_lines_carry_the_count_and_the_time_left(capsys):
    """Under pytest stderr is not a terminal: on stderr, a start line, a line per interval with the
    time left, and a closing line with the total time (the work took at least one interval)."""
    work = progress.Progress(3, "writing videos", unit="videos", interval=0.01)
    for _ in range(3):
        time.sleep(0.02)
        work.update()
    work.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("writing videos: 0/3 videos ...")
    assert any(line.endswith("writing videos: 2/3 videos, 0 s left") for line in lines[1:-1]), lines
    assert lines[-1].endswith("writing videos: 3/3 videos in 0 s")


def test_time_left_follows_the_rate_so_far():
    """After 2 of 10 units in about 0.2 s, about 0.8 s are left; the training log line's status."""
    work = progress.Progress(10, "training", lines=False)
    time.sleep(0.2)
    work.update(2)
    assert 0.7 < work.time_left() < 1.6
    assert work.status().startswith("2/10 it, ") and work.status().endswith(" s left")
    assert progress.duration(3725) == "1 h 02 min" and progress.duration(65) == "1 min 05 s"


def test_inactive_progress_prints_nothing(capsys):
    """Ranks other than 0 count but print nothing."""
    work = progress.Progress(2, "test", active=False, interval=0)
    work.update(2)
    work.close()
    assert capsys.readouterr().err == ""
