"""Progress lines in logs (no terminal): one per 10%, with rate and ETA; the tqdm bar in a terminal."""

import io

from jobs.progress import Progress, format_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_each_ten_percent_with_rate_and_eta():
    stream = io.StringIO()
    with Progress(20, desc="enhance", unit="image", stream=stream) as progress:
        for _ in range(20):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ... 100%: not one line per image
    assert lines[0].startswith("enhance: 10% (2/20 images), ") and "images/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("enhance: 100% (20/20 images)")


def test_callback_form_and_big_jumps_print_once():
    stream = io.StringIO()
    progress = Progress(7, desc="shards", unit="image", stream=stream)
    progress.set(5)  # 71%: one line, not seven
    progress.set(7)
    assert [line.split(":")[1].split("(")[0].strip() for line in stream.getvalue().splitlines()] == ["71%", "100%"]


def test_terminal_gets_the_tqdm_bar():
    stream = _Terminal()
    with Progress(3, desc="enhance", unit="image", stream=stream) as progress:
        progress.update(3)
    assert "3/3" in stream.getvalue() and "\r" in stream.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (42, 725, 11260)] == ["0:42", "12:05", "3:07:40"]


def test_sweep_eta_counts_ended_trials_as_done():
    from jobs.sweeps.tuner import sweep_eta

    line = sweep_eta([("TERMINATED", 40), ("RUNNING", 50), ("RUNNING", 0), ("PENDING", 0)], num_trials=4,
                     total_steps=100, elapsed_s=60)
    # (100 + 50) of 400 steps: 38%; 60 s for 150 steps leaves at most 100 s for the other 250.
    assert line == "[tune] progress: 38% of 4 x 100 steps (1 trials done, 2 running), elapsed 1:00, ETA <= 1:40"
    assert sweep_eta([], 2, 10, 5).endswith("ETA <= ?")
