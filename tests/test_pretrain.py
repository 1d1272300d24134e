"""Self-supervised pretraining on unlabelled maps (nmosd-ms pretrain) and cv starting from it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_manifest_cohort, small_cv_config
from helpers import assert_user_error, run_cli
from safetensors.torch import load_file

from nmosd_ms.bundle import load_bundle
from nmosd_ms.errors import NmosdError


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory):
    """Maps of other people than the shared phantom cache's (IDs sub-00…, other files), at 24³."""
    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.cache import prepare
    from nmosd_ms.data.dataset import load_cohort

    tmp = tmp_path_factory.mktemp("other")
    out = tmp / "c24"
    prepare(load_cohort(make_manifest_cohort(tmp, n_per_class=4)), out, PrepareConfig(size=24))
    return out


@pytest.fixture(scope="module")
def pretrained(other_cache, tmp_path_factory):
    from nmosd_ms.config import PretrainConfig
    from nmosd_ms.training.pretrain import pretrain_weights

    out = tmp_path_factory.mktemp("pre") / "prior"
    config = PretrainConfig(epochs=4, batch_size=4, shift=2)
    return pretrain_weights(other_cache, "twoview-18", out, config, seed=0, device="cpu")


def test_occupancy_target_marks_the_cells_that_hold_lesion():
    from nmosd_ms.training.pretext import occupancy_target

    x = torch.zeros(2, 1, 20, 20, 20)
    x[0, 0, 3, 15, 19] = 1.0  # cell (0, 3, 4) of a 5³ grid (4 voxels per cell)
    t = occupancy_target(x, 5)
    assert t.shape == (2, 125)
    assert t[0].sum() == 1 and t[0].reshape(5, 5, 5)[0, 3, 4] == 1
    assert t[1].sum() == 0  # an empty map holds nothing


def test_pretrain_writes_weights_and_a_record(pretrained, other_cache):
    from nmosd_ms.io import sha256_file
    from nmosd_ms.models import build_model
    from nmosd_ms.training.pretrain import RECORD_NAME, WEIGHTS_NAME, pretraining_record

    weights = pretrained / WEIGHTS_NAME
    record = pretraining_record(weights)
    assert record is not None and (pretrained / RECORD_NAME).is_file()
    assert record.model == "twoview-18" and record.size == 24 and record.n_subjects == 8
    assert record.weights_sha256 == sha256_file(weights)
    assert sorted(record.participant_ids) == [f"sub-{i:02d}" for i in range(8)]
    assert len(record.input_sha256) == 16  # each subject's FLAIR and lesion mask
    losses = [p["loss"] for p in record.curve]
    assert len(losses) == 4 and losses[-1] < losses[0]  # the pretext was learnt
    # the weights load strictly into the model cv builds; the backbone moved from its seeded
    # initialisation, the classifier (never trained) kept it
    state = load_file(str(weights))
    model = build_model("twoview-18", size=24, weights=str(weights))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.manual_seed(0)
    fresh = build_model("twoview-18", size=24).state_dict()
    assert torch.equal(fresh["fc.weight"], state["fc.weight"])
    assert not torch.equal(fresh["views.0.conv.weight"], state["views.0.conv.weight"])
    assert not torch.equal(
        fresh["backbone.layer4.1.conv2.weight"], state["backbone.layer4.1.conv2.weight"]
    )


def test_cv_starts_from_pretrained_weights(other_cache, prepared_small, tmp_path):
    from nmosd_ms.config import PretrainConfig, TrainConfig
    from nmosd_ms.export import export_bundle
    from nmosd_ms.training.cv import run_cv
    from nmosd_ms.training.executors import LocalExecutor
    from nmosd_ms.training.pretrain import WEIGHTS_NAME, pretrain_weights

    prior = pretrain_weights(
        other_cache, "twoview-18", tmp_path / "prior", PretrainConfig(epochs=1)
    )
    weights = str(prior / WEIGHTS_NAME)
    config = small_cv_config(
        models=("twoview-18",),
        repeats=1,
        folds=2,
        train=TrainConfig(epochs=1, batch_size=4, shift=2, weights=weights),
    )
    run_cv(
        prepared_small, tmp_path / "run", config, device="cpu", executor=LocalExecutor(threads=1)
    )
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["train"]["weights"] == weights
    assert run["models"]["twoview-18"]["weights"] == weights
    # the run keeps what the prior saw, so that a bundle exported from it still knows when the
    # prior's folder is gone
    assert run["models"]["twoview-18"]["pretraining"]["n_subjects"] == 8
    # another prior at the same path cannot join the run (its folds would mix two priors)
    shutil.rmtree(prior)
    pretrain_weights(other_cache, "twoview-18", prior, PretrainConfig(epochs=1), seed=1)
    with pytest.raises(NmosdError, match="other pretrained weights"):
        run_cv(
            prepared_small,
            tmp_path / "run",
            config,
            device="cpu",
            executor=LocalExecutor(threads=1),
        )
    shutil.rmtree(prior)
    bundle = load_bundle(export_bundle(tmp_path / "run", "twoview-18", tmp_path / "model"))
    seen = bundle.info.training.pretraining
    assert seen is not None and sorted(seen.participant_ids)[0] == "sub-00"


def test_evaluate_counts_the_priors_maps_as_seen(pretrained, prepared_small, other_cache, tmp_path):
    """A bundle fitted from a prior: an external cohort made of the prior's maps is refused as
    evaluate refuses the training cohort (IDs and identical input files)."""
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.data.dataset import load_cohort
    from nmosd_ms.evaluate import check_overlap, evaluate_cohort
    from nmosd_ms.fit import fit_bundle
    from nmosd_ms.training.pretrain import WEIGHTS_NAME

    train = TrainConfig(epochs=1, batch_size=4, weights=str(pretrained / WEIGHTS_NAME))
    bundle = load_bundle(fit_bundle(prepared_small, "twoview-18", tmp_path / "m", train))
    assert bundle.info.training.pretraining.n_subjects == 8
    prior_maps = load_cohort(other_cache.parent / "manifest.tsv")
    overlap = check_overlap(bundle, prior_maps.subjects)
    assert len(overlap["participants"]) == 8 and len(overlap["files"]) == 16
    with pytest.raises(NmosdError, match="its prior's maps"):
        evaluate_cohort(bundle, prior_maps, tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_cv_refuses_weights_pretrained_on_its_own_maps(prepared_small, tmp_path):
    """Pretraining reads no diagnosis, but a fold whose maps the prior saw is not held out."""
    from nmosd_ms.config import PretrainConfig
    from nmosd_ms.training.pretrain import WEIGHTS_NAME, pretrain_weights

    own = pretrain_weights(
        prepared_small, "twoview-18", tmp_path / "own", PretrainConfig(epochs=1), device="cpu"
    )
    weights = own / WEIGHTS_NAME
    run = tmp_path / "run"
    common = ("cv", prepared_small, "--out", run, "--repeats", "1", "--folds", "2", "--epochs", "1")
    res = run_cli(*common, "--models", "twoview-18", "--weights", weights)
    assert_user_error(res, "pretrained on maps of this cohort", "sub-0")
    assert not run.exists()
    # another model, or the same at another size, is refused too
    res = run_cli(*common, "--models", "twoview-34", "--weights", weights)
    assert_user_error(res, "pretrained for twoview-18 at 24")
    res = run_cli(
        *common, "--models", "twoview-18", "--model-size", "twoview-18=16", "--weights", weights
    )
    assert_user_error(res, "at 24³, not twoview-18 at 16³")
    # a prior copied without its record is refused, not used unchecked
    alone = tmp_path / "elsewhere" / "prior.safetensors"
    alone.parent.mkdir()
    shutil.copyfile(weights, alone)
    res = run_cli(*common, "--models", "twoview-18", "--weights", alone)
    assert_user_error(res, "without its pretrain.json")
    # ... and so is one whose record describes other weights
    shutil.copyfile(own / "pretrain.json", alone.parent / "pretrain.json")
    alone.write_bytes(alone.read_bytes()[:-4] + b"    ")
    res = run_cli(*common, "--models", "twoview-18", "--weights", alone)
    assert_user_error(res, "describes other weights")
    # an edited record is one error line, not a traceback
    record = own / "pretrain.json"
    data = json.loads(record.read_text())
    data["participant_ids"] = "everyone"
    record.write_text(json.dumps(data))
    res = run_cli(*common, "--models", "twoview-18", "--weights", weights)
    assert_user_error(res, "pretraining record", "edited or damaged")


def test_pretrain_cli_refuses_bad_input(other_cache, tmp_path):
    out = tmp_path / "w"
    assert_user_error(run_cli("pretrain", tmp_path / "nope", "--out", out), "nope")
    assert_user_error(run_cli("pretrain", other_cache, "--out", out, "--epochs", "0"), "epochs")
    res = run_cli("pretrain", other_cache, "--out", out, "--model", "lesionload-logreg")
    assert_user_error(res, "only neural-network models")
    assert_user_error(run_cli("pretrain", other_cache, "--out", out, "--grid", "30"), "grid")
    res = run_cli("pretrain", other_cache, "--out", out, "--batch-size", "9")
    assert_user_error(res, "at least one batch")
    assert not out.exists()
    out.mkdir()
    assert_user_error(run_cli("pretrain", other_cache, "--out", out), "exists")


def test_pretrain_cli_writes_the_folder(other_cache, tmp_path):
    out = tmp_path / "prior"
    res = run_cli(
        "pretrain", other_cache, "--out", out, "--epochs", "1", "--threads", "1", "--device", "cpu"
    )
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "pretrain.json",
        "weights.safetensors",
    ]
    record = json.loads((out / "pretrain.json").read_text())
    assert np.isfinite(record["curve"][0]["loss"])
    assert record["environment"]["torch_threads"] == 1  # the threads it trained with
    assert record["environment"]["device"] == "cpu"


def test_a_folds_pretext_reads_only_its_training_maps(prepared_small):
    """``pretext_epochs``: the fold's backbone first learns the pretext on the fold's own
    training maps. The weights it ends with depend on those maps and on no held-out map."""
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.data.cache import load_prepared
    from nmosd_ms.training.loop import FoldData, train_torch_fold

    cohort = load_prepared(prepared_small)
    vols = torch.from_numpy(np.ascontiguousarray(cohort.volumes[:, None]))
    labels = cohort.labels
    test_idx = np.array([0, 1, len(labels) - 1])
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)

    def fold(volumes, pretext_epochs):
        config = TrainConfig(
            epochs=1, batch_size=4, shift=2, pretext_epochs=pretext_epochs, eval_every=100
        )
        fold = FoldData(volumes, labels, train_idx, test_idx)
        out = train_torch_fold("twoview-18", fold, config, seed=5)
        return out.state_dict

    torch.use_deterministic_algorithms(True, warn_only=True)
    plain, pretext = fold(vols, 0), fold(vols, 2)
    key = "backbone.layer4.1.conv2.weight"
    assert not torch.equal(plain[key], pretext[key])  # the pretext moved the backbone
    # other held-out maps: the same weights, bit for bit
    other = vols.clone()
    other[test_idx] = torch.flip(other[test_idx], dims=(-1,)) + (other[test_idx] == 0).float()
    again = fold(other, 2)
    assert all(torch.equal(pretext[k], again[k]) for k in pretext)
    # other training maps: other weights (the pretext read them)
    moved = vols.clone()
    moved[train_idx] = torch.roll(moved[train_idx], shifts=3, dims=-1)
    assert not torch.equal(fold(moved, 2)[key], pretext[key])


def test_cv_records_the_pretext_and_refuses_to_mix_it(prepared_small, tmp_path):
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.training.cv import run_cv
    from nmosd_ms.training.executors import LocalExecutor

    def config(pretext_epochs):
        train = TrainConfig(epochs=1, batch_size=4, shift=2, pretext_epochs=pretext_epochs)
        return small_cv_config(models=("twoview-18",), repeats=1, folds=2, train=train)

    run_cv(
        prepared_small, tmp_path / "run", config(1), device="cpu", executor=LocalExecutor(threads=1)
    )
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["train"]["pretext_epochs"] == 1
    from nmosd_ms.report import build_report

    page = build_report(tmp_path / "run").read_text()
    assert "1 epochs of the occupancy pretext on each fold's own training maps" in page
    with pytest.raises(NmosdError, match="different options"):
        run_cv(
            prepared_small,
            tmp_path / "run",
            config(0),
            device="cpu",
            executor=LocalExecutor(threads=1),
        )
    # a run written before the option existed (no such key) resumes with its default, 0
    run_cv(
        prepared_small, tmp_path / "old", config(0), device="cpu", executor=LocalExecutor(threads=1)
    )
    meta = json.loads((tmp_path / "old" / "run.json").read_text())
    del meta["options"]["train"]["pretext_epochs"]
    (tmp_path / "old" / "run.json").write_text(json.dumps(meta))
    folds = (tmp_path / "old" / "results" / "folds.tsv").read_text()
    run_cv(
        prepared_small, tmp_path / "old", config(0), device="cpu", executor=LocalExecutor(threads=1)
    )
    assert (tmp_path / "old" / "results" / "folds.tsv").read_text() == folds
    with pytest.raises(NmosdError, match="different options"):
        run_cv(
            prepared_small,
            tmp_path / "old",
            config(1),
            device="cpu",
            executor=LocalExecutor(threads=1),
        )
