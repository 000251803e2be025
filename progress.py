"""Progress of a long step with the time left: a tqdm bar in a terminal, plain lines in a log file.

Writing a dataset, training and evaluation can take minutes to days. In a terminal a tqdm bar on
stderr shows the count, the rate and the time left; when stderr is not a terminal (a log file, a
job scheduler) a bar would only write control characters, so a plain line with the same facts goes
to stderr at the start and then every `interval` seconds. Both go to stderr, the stream whose
terminal decides between them, so stdout keeps only results (a log, JSON, a prediction).
"""
import sys
import time

LINE_INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """A duration for people: '42 s', '3 min 05 s', '2 h 07 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def stamped(message: str) -> None:
    """Print one line on stderr with the time of day, as the run log does."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Progress:
    """Count `total` units of work named `what`; show the count and the time left (main process only).

    `lines=False` leaves the plain lines to the caller (the training loop puts `time_left()` into
    its own log lines); a terminal still gets the bar.
    """

    def __init__(self, total: int, what: str, *, unit: str = "it", initial: int = 0,
                 active: bool = True, lines: bool = True, interval: float = LINE_INTERVAL_S,
                 leave: bool = False):
        self.total, self.what, self.unit = int(total), what, unit
        self.start_count = self.count = int(initial)
        self.t0 = self.printed = time.time()
        self.interval = interval
        terminal = sys.stderr.isatty()
        self.bar = None
        if active and terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.count, desc=what, unit=unit,
                            leave=leave, dynamic_ncols=True)
        self.lines = active and lines and not terminal
        if self.lines:
            stamped(f"{what}: {self.count}/{self.total} {unit} ...")

    def time_left(self) -> float | None:
        """Seconds left at the rate of the work done so far in this process (None before any)."""
        done = self.count - self.start_count
        if done <= 0:
            return None
        return (time.time() - self.t0) / done * (self.total - self.count)

    def status(self) -> str:
        """'12/40 it, 1 min 05 s left' (or 'time left unknown' before the first unit)."""
        left = self.time_left()
        return (f"{self.count}/{self.total} {self.unit}, "
                + (f"{duration(left)} left" if left is not None else "time left unknown"))

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        if self.lines and time.time() - self.printed >= self.interval and self.count < self.total:
            stamped(f"{self.what}: {self.status()}")
            self.printed = time.time()

    def write(self, line: str) -> None:
        """Print a line on stdout without breaking the bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the bar; plain lines end with the total time when the work took an interval or more."""
        if self.bar is not None:
            self.bar.close()
        if self.lines and time.time() - self.t0 >= self.interval:
            stamped(f"{self.what}: {self.count}/{self.total} {self.unit} in "
                    f"{duration(time.time() - self.t0)}")
        self.bar, self.lines = None, False
