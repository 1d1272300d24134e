"""Ctrl-C (SIGINT) on every verb that works for more than a moment: exit 130, one last line
``error: interrupted``, no traceback, nothing partial left, at every moment of a run measured by
``benchmarks/interrupt.py`` (which also times it; no time is asserted here).

The signal is sent once the run reports that it reached the moment (its progress log, or the
lock of the folder it writes), never after a guessed delay, and each child gets SIGINT's default
disposition itself, so these tests pass when the suite runs in the background (``nohup make test
&``, where SIGINT is ignored and children inherit that). They are in the full tier (``make
test-all``); the fast tier interrupts ``phantom`` (test_trust).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT  # noqa: F401  (puts the benchmarks package on sys.path)

from benchmarks.interrupt import Inputs, interrupt, manifest_of, scenarios

pytestmark = pytest.mark.slow

#: Each verb at its first and its last moment (the benchmark measures the ones between too).
CASES = [
    pytest.param(s.name, m.name, id=f"{s.name}-{m.name}".replace(" ", "_"))
    for s in scenarios(Inputs(*[Path()] * 5))  # names and moments only: no input is read
    for m in dict.fromkeys((s.moments[0], s.moments[-1]))
]


@pytest.fixture(scope="module")
def inputs(phantom_cohort, prepared_small, small_run, tmp_path_factory) -> Inputs:
    from nmosd_ms.export import export_bundle

    work = tmp_path_factory.mktemp("interrupt")
    bundle = export_bundle(small_run, "twoview-18", work / "bundle")
    flair = next(phantom_cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))
    manifest = manifest_of(phantom_cohort, work / "predict.tsv")
    return Inputs(phantom_cohort, prepared_small, bundle, flair, manifest)


@pytest.mark.parametrize(("scenario", "moment"), CASES)
def test_sigint_ends_the_run_in_one_line_with_exit_130_and_nothing_partial(
    inputs, tmp_path, scenario, moment
):
    case = next(s for s in scenarios(inputs) if s.name == scenario)
    when = next(m for m in case.moments if m.name == moment)
    result = interrupt(case, when, tmp_path)
    assert not result["ended_before_signal"], result  # the moment came while it still worked
    assert result["exit_code"] == 130, result
    assert result["last_line"] == "error: interrupted", result
    assert not result["traceback"], result
    assert result["left"] == [], result
    assert result["ok"]
