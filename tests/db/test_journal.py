"""The crash-safe journal: rows of a killed process are recovered, live journals are not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from podserve.db.journal import Journal, forget, recover_dead_journals


def test_rows_of_a_sigkilled_process_are_recovered(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from podserve.db.journal import Journal
        journal = Journal(Path({str(tmp_path)!r}), rotate_rows=3)
        journal.open()
        for i in range(7):
            journal.append([f"id-{{i}}", i])
        journal.release(2)  # rows 0-1 durable: nothing whole to delete yet (segment 0-2)
        sys.stdout.write("written\\n"); sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and "written" in proc.stdout
    recovered = recover_dead_journals(tmp_path)
    rows = [row for _, segment_rows, _ in recovered for row in segment_rows]
    assert rows == [[f"id-{i}", i] for i in range(7)]
    for path, _, fd in recovered:
        forget(path, fd)
    assert list(tmp_path.iterdir()) == []


def test_live_journal_is_left_alone_and_released_when_durable(tmp_path: Path) -> None:
    journal = Journal(tmp_path, rotate_rows=2)
    journal.open()
    seqs = [journal.append([f"id-{i}"]) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert recover_dead_journals(tmp_path) == []  # we hold the locks: not dead
    journal.release(4)  # rows 0-3 durable: segments [0,1] and [2,3] go
    assert len(list(tmp_path.iterdir())) == 1
    journal.close(all_durable=False)  # row 4 not durable: kept for the next worker
    recovered = recover_dead_journals(tmp_path)
    assert [rows for _, rows, _ in recovered] == [[["id-4"]]]
    for path, _, fd in recovered:
        forget(path, fd)


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "1-1-1.jnl").write_bytes(b'["a", 1]\n["b", 2]\n["c", ')
    recovered = recover_dead_journals(tmp_path)
    assert recovered[0][1] == [["a", 1], ["b", 2]]
    os.close(recovered[0][2])
