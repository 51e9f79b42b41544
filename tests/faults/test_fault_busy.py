"""The overload scenario's helper reads CPU groups the way every kernel writes them."""

from pathlib import Path

import pytest

from faults.fault_busy import cpu_group


def _proc(tmp_path: Path, autogroup: str | None) -> Path:
    task = tmp_path / "42"
    task.mkdir()
    (task / "cgroup").write_text("1:cpu:/ci\n0::/\n")
    if autogroup is not None:
        (task / "autogroup").write_text(autogroup)
    return tmp_path


@pytest.mark.parametrize(
    ("autogroup", "expected"),
    [
        ("/autogroup-2038 nice 0\n", "/autogroup-2038"),
        # A task in no autogroup (a CI container's cpu cgroup) reads an empty file: CI failed
        # on this once.
        ("", ""),
        (None, ""),  # kernel without CONFIG_SCHED_AUTOGROUP
    ],
)
def test_cpu_group_reads_present_empty_and_missing_autogroups(
    tmp_path: Path, autogroup: str | None, expected: str
) -> None:
    assert cpu_group(42, _proc(tmp_path, autogroup)) == ("1:cpu:/ci\n0::/\n", expected)
