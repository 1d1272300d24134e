"""Scale-out on a real scheduler: a one-node SLURM (Debian's slurm-wlm + munge, installed by
.ci/run) runs a cross-validation as a job array of shards plus a collect job, with the
repository's sbatch scripts; shards killed and resubmitted, or started together, complete the
run with the same numbers as a local run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT
from helpers import spawn, wait_for

from nmosd_ms.training.runfolder import DETERMINISTIC_COLUMNS

pytestmark = pytest.mark.slow  # a scheduler started per module: the full tier (make test-all)

SCRIPTS = ROOT / "scripts" / "slurm"
#: The tiny CV of the scheduler tests (16³, 2 repeats x 2 folds, 2 epochs).
CV_OPTIONS = [
    "--models", "twoview-18,lesionload-logreg", "--repeats", "2", "--folds", "2",
    "--epochs", "2", "--batch-size", "4", "--seed", "5", "--device", "cpu",
]  # fmt: skip


def _cv(cache, run, *extra) -> list[str]:
    return [sys.executable, "-m", "nmosd_ms", "cv", str(cache), "--out", str(run), *CV_OPTIONS,
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def cache16(phantom_cohort, tmp_path_factory) -> Path:
    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.cache import prepare
    from nmosd_ms.data.dataset import load_cohort

    out = tmp_path_factory.mktemp("c16") / "cache"
    prepare(load_cohort(phantom_cohort), out, PrepareConfig(size=16))
    return out


@pytest.fixture(scope="module")
def local_folds(cache16, tmp_path_factory) -> pd.DataFrame:
    run = tmp_path_factory.mktemp("local") / "run"
    subprocess.run(_cv(cache16, run, "--threads", "1"), check=True, capture_output=True)
    return pd.read_csv(run / "results" / "folds.tsv", sep="\t")


def _same(run: Path, local: pd.DataFrame) -> None:
    got = pd.read_csv(run / "results" / "folds.tsv", sep="\t")
    pd.testing.assert_frame_equal(got[DETERMINISTIC_COLUMNS], local[DETERMINISTIC_COLUMNS])


def test_two_shards_started_together_complete_one_run(cache16, local_folds, tmp_path):
    run = tmp_path / "run"
    procs = [
        spawn(_cv(cache16, run, "--threads", "1", "--shard", f"{i}/2"),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in (1, 2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    _same(run, local_folds)
    res = subprocess.run(_cv(cache16, run, "--collect"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads((run / "run.json").read_text())["finished"]


def test_a_killed_shard_resubmitted_completes_the_run(cache16, local_folds, tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(_cv(cache16, run, "--collect"), capture_output=True, text=True)
    assert res.returncode == 2 and "no run to collect" in res.stderr
    assert not run.exists()  # a refused collect writes nothing
    shard = _cv(cache16, run, "--threads", "1", "--shard", "1/2")
    proc = spawn(shard, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folds = run / "folds"
    # kill it once it has finished a fold and works on the next
    wait_for(lambda: list(folds.glob("twoview-18/*/*.json")), "a fold record", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(_cv(cache16, run, "--collect"), capture_output=True, text=True)
    assert res.returncode == 2 and "unfinished" in res.stderr  # collect refuses a partial run
    for s in ("1/2", "2/2"):  # resubmitted
        res = subprocess.run(_cv(cache16, run, "--threads", "1", "--shard", s),
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 0, res.stderr
    _same(run, local_folds)


# --- a real scheduler --------------------------------------------------------------------------


SLURM_CONF = """ClusterName=nmosdms
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _start_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM started here (the daemons directly, no systemd); skipped with the
    reason where it cannot run (not root, packages absent, daemons that do not come up)."""
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(c)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} absent; .ci/run installs it)")
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    base = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool"):
        (base / d).mkdir()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    memory = max(1024, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 2048)
    conf = base / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(host=host, base=base, cpus=os.cpu_count() or 1, memory=memory)
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        _start_munge()
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env, timeout=30)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, timeout=30)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"SLURM did not start: {exc}")
    try:
        deadline = time.monotonic() + 300  # a hang guard: the node is up in seconds
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env
            )
            state = res.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            log = (
                (base / "slurmctld.log").read_text()[-600:]
                if (base / "slurmctld.log").exists()
                else ""
            )
            pytest.skip(f"the SLURM node did not become idle ({state!r}): {log}")
        yield env
    finally:
        for name in ("slurmd", "slurmctld"):
            pid = base / f"{name}.pid"
            if pid.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid.read_text().strip()), signal.SIGTERM)


def _wait(job: str, env: dict, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, env=env)
        if not res.stdout.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"SLURM job {job} did not finish in {timeout} s")


def test_a_slurm_job_array_and_collect_equal_the_local_run(slurm, cache16, local_folds, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    env = {**slurm, "NMOSD_MS": f"{sys.executable} -m nmosd_ms"}
    sbatch = ["sbatch", "--parsable", f"--chdir={logs}"]
    t0 = time.monotonic()
    array = subprocess.run(
        [*sbatch, "--array=1-2", str(SCRIPTS / "cv-array.sbatch"), str(cache16), str(run),
         *CV_OPTIONS],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    collect = subprocess.run(
        [*sbatch, f"--dependency=afterok:{array}", str(SCRIPTS / "collect.sbatch"), str(cache16),
         str(run), *CV_OPTIONS],
        capture_output=True, text=True, env=env, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    _wait(collect, env)
    wall = time.monotonic() - t0
    outputs = {p.name: p.read_text()[-500:] for p in logs.glob("*.out")}
    assert (run / "results" / "folds.tsv").is_file(), outputs
    _same(run, local_folds)
    import json

    meta = json.loads((run / "run.json").read_text())
    assert meta["finished"], outputs
    writers = {json.loads(p.read_text())["writer"]["pid"] for p in (run / "folds").rglob("*.json")}
    assert len(writers) == 2  # the two array tasks trained the folds between them
    print(f"SLURM array (2 tasks) + collect, tiny CV: {wall:.0f} s wall")


def test_dask_jobqueue_on_slurm_equals_the_local_run(
    slurm, cache16, local_folds, tmp_path, monkeypatch
):
    """The README's recipe: a dask-jobqueue SLURMCluster (one single-threaded worker per job)
    and cv given its scheduler (the executor object, as ``--scheduler ADDRESS`` makes it)."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    import nmosd_ms as nm
    from nmosd_ms.training.executors import DaskExecutor

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    logs = tmp_path / "logs"
    logs.mkdir()
    cluster = SLURMCluster(
        cores=1,
        processes=1,
        memory="3GB",
        walltime="00:20:00",
        python=sys.executable,
        log_directory=str(logs),
        scheduler_options={"dashboard_address": None},
    )
    try:
        cluster.scale(jobs=2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
        config = nm.CVConfig(
            models=("twoview-18", "lesionload-logreg"),
            repeats=2,
            folds=2,
            seed=5,
            train=nm.TrainConfig(epochs=2, batch_size=4),
        )
        run = tmp_path / "run"
        executor = DaskExecutor(scheduler=cluster.scheduler_address, threads=1)
        meta = nm.run_cv(cache16, run, config, device="cpu", executor=executor)
        assert meta["finished"] and meta["executor"]["scheduler"] == cluster.scheduler_address
        _same(run, local_folds)
    finally:
        cluster.close()


def test_gpu_workers_each_see_only_their_own_device(cache16):
    """One worker per GPU, pinned by CUDA_VISIBLE_DEVICES: checked on real worker processes with
    a fake device list (no GPU here), and the choice made for --device cuda on several GPUs."""
    from unittest import mock

    from nmosd_ms.training import executors as ex

    specs = ex.gpu_worker_specs(["0", "1"])
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["0", "1"]
    assert all(s["options"]["nthreads"] == 1 for s in specs.values())  # one fold per GPU
    with pytest.raises(ValueError, match="distinct"):
        ex.gpu_worker_specs(["0", "0"])
    with ex.DaskExecutor(gpus=["0", "1"], threads=1) as dask_ex:
        seen = dask_ex.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        assert dask_ex._capacity() == 2
    with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": "2,3,5"}):
        assert ex.visible_gpus() == ["2", "3", "5"]
        made = ex.make_executor("dask", device="cuda", threads=1)
        assert made.gpus == ["2", "3", "5"] and made.workers == 3
        assert ex.make_executor("dask", device="cpu").gpus is None
        assert ex.make_executor("dask", scheduler="tcp://x:1", device="cuda").gpus is None
