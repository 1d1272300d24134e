"""Errors that click finds itself (option bounds, missing or unknown options and verbs) follow
the same contract as the project's own: one ``error:`` line, exit 2, nothing else."""

from __future__ import annotations

import pytest
from helpers import assert_user_error, run_cli


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("cv", "cache", "--out", "run", "--threads", "-1"), "--threads"),
        (("cv", "cache"), "missing option '--out'"),
        (("prepare",), "missing argument"),
        (("segment", "--flair", "f.nii.gz", "--out", "m.nii.gz", "--bogus"), "--bogus"),
        (("nosuchverb",), "no such command"),
    ],
)
def test_click_usage_errors_are_one_line(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = assert_user_error(run_cli(*args), fragment)
    assert "--help" in line  # it says where to look
    assert not any(tmp_path.iterdir())  # and wrote nothing


def test_help_and_version_still_exit_zero():
    res = run_cli("cv", "--help")
    assert res.exit_code == 0 and "--threads" in res.stdout
    res = run_cli("--version")
    assert res.exit_code == 0 and "nmosd-ms" in res.stdout


def test_an_error_before_any_progress_leaves_no_blank_progress_line(tmp_path):
    res = run_cli("demo", "--out", tmp_path / "d", "--difficulty", "bogus")
    assert_user_error(res, "--difficulty")
    assert res.stderr.splitlines() == [res.stderr.strip()]  # no empty line from a progress bar
    assert not (tmp_path / "d").exists()
