"""The protocol harness end to end on scikit-learn's digits: real index, real training, real methods, real files."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tmu_core.cli import cli
from tmu_core.cli import evaluate_cmd  # noqa: F401  attaches the evaluate command
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate import MethodSpec, builtin_protocol, customize, format_table, run_protocol
from tmu_core.evaluate.cache import model_key, open_index
from tmu_core.evaluate.report import CSV_COLUMNS
from tmu_core.evaluate.splits import draw_forget_sets
from tmu_core.train import load_checkpoint

CPU = torch.device("cpu")
LABELS = ["original", "gold", "gold-floor", "finetune", "neg_grad", "tmu"]


def _tiny_protocol():
    base = builtin_protocol("digits-tiny")
    methods = (
        MethodSpec("finetune", "finetune", {"epochs": 1}),
        MethodSpec("neg_grad", "neg_grad", {"epochs": 1}),
        MethodSpec("tmu", "tmu", {"twin_epochs": 2, "clf_epochs": 20, "cf_epochs": 1, "max_steps": 5}),
    )
    return replace(base, train=replace(base.train, epochs=4), forget_size=15, methods=methods)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("eval-out")
    before = _index_state(cache_dir)
    result = run_protocol(_tiny_protocol(), out, CPU, cache_dir=cache_dir, progress=False)
    return result, out, before, _index_state(cache_dir)


def _index_state(cache_dir):
    index = open_index(_tiny_protocol().source, cache_dir)
    try:
        info = index.info()
        blobs = hashlib.sha256((index.root / "blobs.bin").read_bytes()).hexdigest()
        return info.counts, info.tombstones, index.ids("train"), index.ids("test"), blobs
    finally:
        index.close()


def test_rows_cover_every_model_and_the_mean(run):
    result, _, _, _ = run
    assert [row.method for row in result.rows] == LABELS
    assert [row.method for row in result.means] == LABELS
    assert all(row.forget_class == 3 and row.seed == 0 for row in result.rows)
    assert all(row.runs == 1 and row.class_name == "mean" for row in result.means)
    assert all(row.lira_auc is None and row.lira_gap is None for row in (*result.rows, *result.means))
    assert result.splits.forget == 15
    assert result.splits.twin + result.splits.eval == 359  # the digits test split, cut in two


def test_metrics_are_consistent_with_the_gold_row(run):
    result, _, _, _ = run
    by_label = {row.method: row for row in result.rows}
    gold = by_label["gold"]
    assert gold.delta == 0.0 and gold.ad == pytest.approx(0.0, abs=1e-7)
    for row in result.rows:
        assert row.delta == pytest.approx(abs(row.acc_df - gold.acc_df))
        assert row.gold_asr == gold.asr
        assert 0.0 <= row.asr <= 100.0 and 0.0 <= row.acc_dtest <= 100.0
    # Accuracy steps are 1/15 on a 15-sample forget set.
    assert all(round(row.acc_df * 15 / 100) == pytest.approx(row.acc_df * 15 / 100, abs=1e-4) for row in result.rows)
    assert by_label["tmu"].acc_gl is not None and by_label["gold-floor"].acc_gl is not None
    assert by_label["finetune"].acc_gl is None and by_label["original"].acc_gl is None
    assert by_label["tmu"].prepare_seconds > 0 and by_label["tmu"].details["predicted_hard"] >= 0
    assert result.originals[0].train_accuracy > 90.0


def test_the_index_is_left_unchanged(run):
    _, _, before, after = run
    assert before == after
    assert after[1] == 0  # no tombstones


def test_json_holds_protocol_rows_and_means(run):
    result, out, _, _ = run
    data = json.loads((out / "results.json").read_text())
    assert data["protocol"]["name"] == "digits-tiny"
    assert data["protocol"]["forget_classes"] == [3]
    assert [row["method"] for row in data["rows"]] == LABELS
    assert data["rows"][LABELS.index("neg_grad")]["acc_df"] == pytest.approx(result.rows[4].acc_df)
    assert data["files"]["csv"].endswith("results.csv")
    assert data["originals"][0]["seed"] == 0


def test_csv_has_one_line_per_row_and_mean(run):
    result, out, _, _ = run
    with (out / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        lines = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(lines) == 2 * len(LABELS)
    assert [line["class_name"] for line in lines[len(LABELS):]] == ["mean"] * len(LABELS)
    tmu = lines[LABELS.index("tmu")]
    assert float(tmu["delta"]) == pytest.approx(result.rows[5].delta)
    assert lines[LABELS.index("finetune")]["acc_gl"] == ""


def test_png_and_table_are_written(run):
    result, out, _, _ = run
    with Image.open(out / "results.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    table = (out / "results.txt").read_text()
    assert table.strip() == format_table(result).strip()
    for label in LABELS:
        assert f"\n{label} " in table
    assert "eval split" in table and "twin" in table and "train accuracy" in table
    assert "LiRA" not in table and result.originals[0].shadows is None  # the population attack alone


def test_a_rerun_reuses_cached_models(run, tmp_path, cache_dir):
    result, _, _, _ = run
    protocol = replace(_tiny_protocol(), methods=(MethodSpec("finetune", "finetune", {"epochs": 1}),))
    again = run_protocol(protocol, tmp_path, CPU, cache_dir=cache_dir, progress=False)
    assert again.originals[0].cached
    assert again.originals[0].train_accuracy == pytest.approx(result.originals[0].train_accuracy)
    gold_first = next(r for r in result.rows if r.method == "gold")
    gold_again = next(r for r in again.rows if r.method == "gold")
    assert gold_again.acc_df == gold_first.acc_df and gold_again.seconds == gold_first.seconds


def test_cli_prints_the_table(run, tmp_path, cache_dir):
    args = ["evaluate", "--protocol", "digits-tiny", "--methods", "neg_grad", "--epochs", "4", "--forget-size", "15",
            "--out", str(tmp_path / "cli"), "--cache-dir", str(cache_dir), "--device", "cpu", "--no-progress"]
    outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    assert "ACC_Dtest" in outcome.output and "\nneg_grad " in outcome.output
    assert (tmp_path / "cli" / "results.csv").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "3,x"], "'x' is not an integer"),
        (["--methods", "finetune", "--noise", "1"], "add tmu to --methods"),
        (["--methods", "nope"], "unknown unlearning method 'nope'"),
        (["--features", "df,zz"], "use a non-empty subset of df, af, cf, prior"),
        (["--variant", "tmu:nope=1"], "unknown option(s) nope for method 'tmu'"),
        (["--variant", "fisher:alpha"], "'alpha' is not key=value"),
        (["--classes", "12"], "forget class 12 does not exist"),
        (["--forget-size", "500"], "accepted 1.."),
        (["--forget-shape", "blob"], "unknown forget shape 'blob'; accepted: class, random, owner"),
        (["--owners", "2"], "--owners applies to the owner forget shape, not to class (--forget-shape)"),
        (["--forget-shape", "random", "--forget-size", "5"], "--forget-size applies to the class forget shape"),
        (["--experiments", "2"], "--experiments applies to the random and owner forget shapes, not to class"),
        (["--forget-shape", "random", "--forget-fraction", "1.5"], "forget_fraction must be a number in (0, 1)"),
        (["--forget-shape", "random", "--forget-fraction", "0.0001"], "accepted: a fraction that gives 1.."),
        (["--forget-shape", "owner", "--owners", "300", "--experiments", "5"], "accepted: owners x experiments"),
        (["--wide-test"], "the digits-tiny protocol reads digits, whose index holds every test image already"),
    ],
)
def test_cli_rejects_bad_options(args, message, tmp_path, cache_dir):
    outcome = CliRunner().invoke(cli, ["evaluate", "--protocol", "digits-tiny", "--out", str(tmp_path),
                                       "--cache-dir", str(cache_dir), "--no-progress", *args])
    assert outcome.exit_code != 0
    assert message in outcome.output


def test_protocol_rejects_bad_values():
    base = builtin_protocol("digits-tiny")
    with pytest.raises(InvalidInputError, match="mia_alpha"):
        replace(base, mia_alpha=1.5)
    with pytest.raises(InvalidInputError, match="seeds lists a value more than once"):
        replace(base, seeds=(0, 0))
    with pytest.raises(InvalidInputError, match="at least one method"):
        replace(base, methods=())
    with pytest.raises(InvalidInputError, match="unknown model architecture 'lenet'"):
        replace(base, arch="lenet")
    assert replace(base, arch="torchvision:resnet18").arch == "torchvision:resnet18"
    with pytest.raises(InvalidInputError, match="resize needs image_size"):
        replace(base, source=replace(base.source, resize=40))
    with pytest.raises(InvalidInputError, match="preprocess resize must be an int >= size"):
        replace(base, source=replace(base.source, image_size=48, resize=40))
    with pytest.raises(InvalidInputError, match="unknown option"):
        replace(base, methods=(MethodSpec("finetune", "finetune", {"epoch": 3}),))
    with pytest.raises(InvalidInputError, match="reserved"):
        replace(base, methods=(MethodSpec("gold", "finetune", {}),))
    with pytest.raises(InvalidInputError, match="unknown protocol"):
        builtin_protocol("imagenet")


def test_cifar_protocol_without_data_names_the_missing_zip(tmp_path):
    with pytest.raises(InvalidInputError, match="pass --data"):
        builtin_protocol("cpu-small", data=tmp_path / "missing.zip")


def test_customize_expands_tmu_ablations():
    protocol = customize(builtin_protocol("digits-tiny"), methods=["finetune", "tmu"], noise_levels=[0.0, 3.0],
                         feature_sets=[["df"], ["cf", "df"]], classes=[1, 2], forget_size=10, seeds=[0, 1])
    assert [spec.label for spec in protocol.methods] == [
        "finetune", "tmu[df,noise=0]", "tmu[df,noise=3]", "tmu[df+cf,noise=0]", "tmu[df+cf,noise=3]"]
    assert protocol.methods[-1].options == {"features": ("df", "cf"), "noise_std": 3.0}
    assert protocol.forget_classes == (1, 2) and protocol.forget_size == 10 and protocol.seeds == (0, 1)


def test_customize_adds_variant_rows_labelled_with_their_text():
    protocol = customize(builtin_protocol("digits-tiny"), methods=["tmu"],
                         variants=["tmu:cf_per_request=true", " fisher:alpha=0.03,samples=10 "])
    assert [(s.label, s.name) for s in protocol.methods] == [
        ("tmu", "tmu"), ("tmu:cf_per_request=true", "tmu"), ("fisher:alpha=0.03,samples=10", "fisher")]
    assert protocol.methods[1].options == {"cf_per_request": True}
    assert protocol.methods[2].options == {"alpha": 0.03, "samples": 10}


def test_a_protocol_reads_the_index_through_its_preprocessing(run, tmp_path, cache_dir):
    """12 px models on the 8 px digits: trained, unlearned and scored on resized images, cached apart."""
    base = _tiny_protocol()
    protocol = replace(base, source=replace(base.source, image_size=12),
                       methods=(MethodSpec("tmu", "tmu", {"twin_epochs": 1, "clf_epochs": 5, "cf_epochs": 1,
                                                          "max_steps": 2}),))
    result = run_protocol(protocol, tmp_path, CPU, cache_dir=cache_dir, progress=False)
    assert not result.originals[0].cached  # not the 8 px model of the first run
    _, meta = load_checkpoint(result.originals[0].checkpoint, CPU)
    assert meta.image_size == 12 and meta.preprocess == {"size": 12, "resize": None, "channels": 1,
                                                          "interpolation": "bilinear"}
    assert {r.method for r in result.rows} >= {"original", "gold", "tmu"}


def test_results_record_the_class_shape(run):
    result, _, _, _ = run
    assert result.protocol["forget_shape"] == "class" and result.protocol["experiments"] is None
    assert all(row.class_name == "3" for row in result.rows)  # the digits class names
    assert all("forget_shape" not in row.details for row in result.rows)


def test_owner_batches_run_as_experiments_named_by_their_shape(run, tmp_path, cache_dir):
    protocol = replace(_tiny_protocol(), forget_shape="owner", owners=3, experiments=2,
                       methods=(MethodSpec("finetune", "finetune", {"epochs": 1}),))
    result = run_protocol(protocol, tmp_path, CPU, cache_dir=cache_dir, progress=False)
    assert result.originals[0].cached  # the same original as the class run
    assert [(row.class_name, row.method) for row in result.rows] == [
        (name, label) for name in ("owners3-0", "owners3-1") for label in ("original", "gold", "gold-floor",
                                                                           "finetune")]
    assert all(row.forget_class is None and len(row.details["owners"]) == 3 for row in result.rows)
    sizes = [row.details["forget_samples"] for row in result.rows if row.method == "gold"]
    assert result.splits.forget == round(sum(sizes) / 2)
    assert [row.runs for row in result.means] == [2] * 4
    table = (tmp_path / "results.txt").read_text()
    assert "forget 3 owner(s) of a synthetic owner map" in table and "in each of 2 experiment(s)" in table
    assert f"owners3-0: {sizes[0]} samples from " in table and "owners3-1: " in table
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["protocol"]["forget_shape"] == "owner" and data["rows"][0]["class_name"] == "owners3-0"


def test_gold_models_of_different_shapes_are_cached_apart(cache_dir):
    protocol = _tiny_protocol()
    index = open_index(protocol.source, cache_dir)
    try:
        train = index.ids("train")
        draws = [*draw_forget_sets(index, "class", 0, classes=[3], size=15),
                 *draw_forget_sets(index, "random", 0, fraction=0.01, experiments=2),
                 *draw_forget_sets(index, "owner", 0, owners=1, experiments=2)]
        keys = set()
        for draw in draws:
            forget = set(draw.forget_ids)
            retain = [sample for sample in train if sample not in forget]
            keys.add(model_key(protocol.arch, protocol.train, protocol.source, index.fingerprint(retain)))
    finally:
        index.close()
    assert len(keys) == len(draws)


def test_cli_runs_the_random_shape(run, tmp_path, cache_dir):
    args = ["evaluate", "--protocol", "digits-tiny", "--methods", "neg_grad", "--epochs", "4",
            "--forget-shape", "random", "--forget-fraction", "0.02", "--out", str(tmp_path / "cli"),
            "--cache-dir", str(cache_dir), "--device", "cpu", "--no-progress"]
    outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    assert "random training samples (2% of the training set) in each of 1 experiment(s)" in outcome.output
    assert "\nrandom-2%-0: " in outcome.output and "\nneg_grad " in outcome.output


def test_protocol_and_customize_check_the_forget_shape():
    base = builtin_protocol("digits-tiny")
    assert base.forget_shape == "class" and base.experiment_count == 1
    assert replace(base, forget_shape="random", experiments=4).experiment_count == 4
    assert replace(base, forget_shape="owner", forget_classes=(1, 2)).experiment_count == 2
    with pytest.raises(InvalidInputError, match="unknown forget shape 'owners'; accepted: class, random, owner"):
        replace(base, forget_shape="owners")
    with pytest.raises(InvalidInputError, match="experiments applies to the random and owner forget shapes"):
        replace(base, experiments=2)
    with pytest.raises(InvalidInputError, match="owners: every value must be an integer >= 1"):
        replace(base, forget_shape="owner", owners=0)
    protocol = customize(base, forget_shape="owner", owners=5, experiments=3)
    assert (protocol.forget_shape, protocol.owners, protocol.experiments) == ("owner", 5, 3)
    with pytest.raises(InvalidInputError, match="--classes applies to the class forget shape, not to owner"):
        customize(base, forget_shape="owner", classes=[1])
    with pytest.raises(InvalidInputError, match="--forget-fraction applies to the random forget shape"):
        customize(replace(base, forget_shape="owner"), forget_fraction=0.1)


def test_the_wide_test_set_scores_every_row_on_the_zips_other_test_images(tmp_path):
    """``wide_test``: each row's accuracy on every test image of the zip but the twin part, read from its own
    cached index; checked against the original model scored by hand on those images."""
    from test_index_support import zip_tree
    from test_service_support import write_tree

    from tmu_core.evaluate.cache import open_wide_index
    from tmu_core.evaluate.protocols import DataSource
    from tmu_core.evaluate.splits import split_test
    from tmu_core.train import predict_logits

    write_tree(tmp_path / "tree", train=10, test=12)  # 4 classes of 16 px images
    data = zip_tree(tmp_path / "tree", tmp_path / "data.zip")
    source = DataSource("cifar10-zip", str(data), train_per_class=10, test_per_class=4)
    protocol = replace(_tiny_protocol(), name="zip-tiny", source=source, forget_classes=(1,), forget_size=3,
                       methods=(MethodSpec("finetune", "finetune", {"epochs": 1}),), wide_test=True)
    protocol = customize(protocol, split_seed=2)  # any twin part: the wide set is the rest of the zip
    cache = tmp_path / "cache"
    result = run_protocol(protocol, tmp_path / "out", CPU, cache_dir=cache, progress=False)

    index = open_index(source, cache)
    try:
        twin = set(split_test(index, protocol.twin_fraction, protocol.split_seed).twin_ids)
        assert twin != set(split_test(index, protocol.twin_fraction, 0).twin_ids)
    finally:
        index.close()
    with open_wide_index(source, cache) as wide:
        ids = [sample for sample in wide.ids("test") if sample not in twin]
        images, labels = wide.load(ids), torch.as_tensor(wide.labels(ids))
    assert len(ids) == 4 * 12 - len(twin) == result.splits.wide == 40
    model, _ = load_checkpoint(result.originals[0].checkpoint, CPU)
    by_hand = 100.0 * (predict_logits(model, images, CPU, 64).argmax(1) == labels).float().mean().item()
    rows = {row.method: row for row in result.rows}
    assert rows["original"].acc_wide == pytest.approx(by_hand)
    assert all(row.acc_wide is not None for row in result.rows + result.means)
    table = (tmp_path / "out" / "results.txt").read_text()
    assert "ACC_wide" in table and "40 test images of the zip" in table and "split seed 2" in table
    with open(tmp_path / "out" / "results.csv") as handle:
        assert all(line["acc_wide"] for line in csv.DictReader(handle))


def test_the_wide_test_set_needs_a_zip_source():
    with pytest.raises(InvalidInputError, match="wide_test scores the rest of a CIFAR-10 zip"):
        replace(_tiny_protocol(), wide_test=True)
