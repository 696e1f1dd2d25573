"""Progress in a log file: a few lines per stage, in the right unit, not a bar redrawn hundreds of times."""
import io

from tasks.progress import LineProgress, driver_progress


def test_line_progress_prints_one_line_per_quarter():
    out = io.StringIO()
    bar = LineProgress(650, "extract cnn-s0/id-train", "images", file=out)
    for _ in range(26):
        bar.update(25)  # 650 images in batches of 25
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["extract cnn-s0/id-train: 175/650 images (26%)", "extract cnn-s0/id-train: 325/650 images (50%)",
                     "extract cnn-s0/id-train: 500/650 images (76%)", "extract cnn-s0/id-train: 650/650 images (100%)"]


def test_line_progress_closes_with_a_last_line_and_handles_empty_work():
    out = io.StringIO()
    with LineProgress(10, "[search]", "trials", file=out) as bar:
        bar.update(3)
    assert out.getvalue().splitlines() == ["[search]: 3/10 trials (30%)"]
    empty = io.StringIO()
    with LineProgress(0, "[test]", "searches", file=empty):
        pass
    assert empty.getvalue() == ""


def test_the_driver_draws_lines_when_its_output_is_not_a_terminal(capsys):
    bar = driver_progress(4, "search", "trials")  # pytest captures stdout: not a terminal
    assert isinstance(bar, LineProgress)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().out.splitlines() == [f"[search]: {i}/4 trials ({25 * i}%)" for i in range(1, 5)]
