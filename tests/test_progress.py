"""Progress lines for long driver-side work, as a log file or CI sees them (not a terminal)."""

import io

from cifar_ray.progress import Progress, format_duration


def test_plain_lines_count_towards_the_total_with_an_eta_then_a_last_line():
    out = io.StringIO()
    progress = Progress("evaluate", total=400, every_s=0, stream=out)
    for _ in range(4):
        progress.update(100)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("evaluate: 100/400 images (25%), ") and ", ETA " in lines[0]
    assert lines[3].startswith("evaluate: 400/400 images (100%), ") and lines[3].endswith("ETA 0s")
    assert lines[-1].startswith("evaluate: 400 images in ")


def test_an_unknown_total_gives_a_count_and_rate_and_lines_are_spaced_out():
    out = io.StringIO()
    progress = Progress("predict", total=None, every_s=3600, stream=out)
    progress.update(10)  # not a line yet: the last one was under an hour ago
    assert out.getvalue() == ""
    progress.every_s = 0
    progress.update(10)
    assert out.getvalue().startswith("predict: 20 images, ") and "ETA" not in out.getvalue()


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m"]
