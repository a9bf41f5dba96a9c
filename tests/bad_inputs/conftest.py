"""The bad-input corpus: every user mistake is one line on stderr, exit 2, nothing left behind.

Each test module here covers one class of bad input (model files, calibration data, options,
run inputs, output folders, tuning folders, RPC faults). They share two fixtures:

- ``cli(argv)`` runs ``tvmq`` in-process with ``-q`` and returns ``(status, stdout, stderr)``;
- ``expect_user_error(argv, watch=[paths])`` runs it and checks the contract: exit status 2,
  exactly one line on stderr starting with ``tvmq: error:``, no traceback, and every file
  under the watched folders unchanged (same names, same bytes: nothing of the user's lost,
  nothing half-written left behind).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def snapshot(paths) -> dict[str, str]:
    """Relative file name -> sha256 of every file under ``paths`` (hidden files included)."""
    state: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        if root.is_file():
            state[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            state[str(root)] = "<missing>"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                state[os.path.join(dirpath, d) + "/"] = "<dir>"
            for f in filenames:
                p = os.path.join(dirpath, f)
                state[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return state


@pytest.fixture
def cli(capsys):
    """Run ``tvmq -q ARGV...`` in-process: (exit status, stdout, stderr)."""
    from tvmq.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = main(["-q", *[str(a) for a in argv]])
        except SystemExit as e:  # argparse errors
            status = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def expect_user_error(cli):
    """Run the CLI and check the bad-input contract; returns stderr's one line."""

    def check(argv: list[str], watch=(), contains: str | None = None) -> str:
        before = snapshot(watch)
        status, _out, err = cli(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, f"tvmq {argv}: exit {status}, stderr:\n{err}"
        assert "Traceback" not in err, err
        assert len(lines) == 1, f"tvmq {argv}: expected one line on stderr, got:\n{err}"
        assert lines[0].startswith("tvmq: error:") or lines[0].startswith("tvmq: "), lines[0]
        assert "internal error" not in lines[0], lines[0]
        if contains is not None:
            assert contains.lower() in lines[0].lower(), lines[0]
        after = snapshot(watch)
        assert after == before, (
            f"tvmq {argv} changed files it was not asked to write:\n"
            f"  gone or changed: {sorted(k for k in before if before[k] != after.get(k))}\n"
            f"  new: {sorted(set(after) - set(before))}"
        )
        return lines[0]

    return check
