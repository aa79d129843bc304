"""What the client logs about a long transfer, from plain samples and a fake clock."""

from __future__ import annotations

from common.wire import Phase
from fl_client.site.progress_log import ProgressReport

MIB = 1024 * 1024


def test_one_line_per_interval_with_rate_and_eta() -> None:
    report = ProgressReport(interval_s=10.0)
    assert report.phase(0.0, Phase.DOWNLOADING, 0, 100 * MIB) is None
    lines = []
    for t in range(1, 31):  # 1 MiB/s, sampled every second
        line = report.tick(float(t), t * MIB)
        if line:
            lines.append((t, line))
    assert [t for t, _ in lines] == [10, 20, 30]
    assert lines[0][1] == "download: 10.0 MiB / 100.0 MiB (10%), 1.0 MiB/s, ETA 1:30"
    assert lines[2][1] == "download: 30.0 MiB / 100.0 MiB (30%), 1.0 MiB/s, ETA 1:10"


def test_closing_line_when_the_phase_changes() -> None:
    report = ProgressReport(interval_s=10.0)
    report.phase(100.0, Phase.DOWNLOADING, 0, 64 * MIB)
    line = report.phase(104.0, Phase.TRAINING, 64 * MIB, 64 * MIB)
    assert line == "download finished: 64.0 MiB / 64.0 MiB (100%) in 4.0 s, mean 16.0 MiB/s"
    line = report.phase(105.0, Phase.IDLE, 32 * MIB, 0)
    assert line == "training stopped: 32.0 MiB / 64.0 MiB (50%) in 1.0 s, mean 32.0 MiB/s"


def test_a_stalled_transfer_shows_no_rate_and_no_eta() -> None:
    report = ProgressReport(interval_s=5.0)
    report.phase(0.0, Phase.UPLOADING, 0, 10 * MIB)
    report.tick(1.0, MIB)
    report.tick(2.0, 2 * MIB)
    line = None
    for t in range(3, 31):
        line = report.tick(float(t), 2 * MIB) or line
    assert line == "upload: 2.0 MiB / 10.0 MiB (20%), 0 B/s, ETA -"


def test_nothing_is_said_while_idle() -> None:
    report = ProgressReport(interval_s=1.0)
    assert report.tick(5.0, 0) is None
    assert report.phase(6.0, Phase.IDLE, 0, 0) is None
    assert report.phase(7.0, Phase.DONE, 0, 0) is None
