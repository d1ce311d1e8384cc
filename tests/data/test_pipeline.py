"""Pipeline: per-process sharding, the two training views, resumption, padding, missing data, TFDS sources."""

import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vpns_jax.data import pipeline, registry, transforms


def _source(n, size=6):
    """In-memory examples whose pixels encode their index (so batches can be traced back)."""
    return [{"image": np.full((size, size, 3), i, np.uint8), "label": i % 5} for i in range(n)]


def _indices(batch):
    return batch["image"][:, 0, 0, 0].astype(int).tolist()


def test_processes_read_disjoint_shards_covering_each_example_once_per_epoch():
    source = _source(20)
    seen = []
    for process in range(3):
        stream = pipeline.BatchStream(source, global_batch_size=6, image_size=6, view="clean", seed=3,
                                      process_index=process, process_count=3)
        assert stream.batches_per_epoch == 3 and stream.local_batch_size == 2
        for batch in range(3):
            seen += stream.local_indices(epoch=1, batch=batch).tolist()
    # 3 full global batches of 6 = the first 18 examples of the epoch's permutation, each exactly once.
    assert len(seen) == len(set(seen)) == 18
    order = np.random.default_rng((3, 0, 1)).permutation(20)
    assert sorted(seen) == sorted(order[:18].tolist())


def test_eval_stream_covers_every_example_once_and_pads_with_minus_one():
    source = _source(10)
    labels, images = [], []
    for process in range(2):
        stream = pipeline.eval_stream(source, global_batch_size=4, image_size=6, process_index=process, process_count=2)
        for batch in stream.epoch_batches():
            labels += batch["label"].tolist()
            images += [i for i, l in zip(_indices(batch), batch["label"]) if l >= 0]
    assert stream.batches_per_epoch == 3
    assert sorted(images) == list(range(10))
    assert labels.count(pipeline.PAD_LABEL) == 2


def test_views_follow_the_transforms_and_streams_shuffle_independently():
    source = [{"image": np.random.default_rng(i).integers(0, 255, (5, 7, 1), dtype=np.uint8), "label": i} for i in range(12)]
    clean, augmented = pipeline.training_streams(source, global_batch_size=4, image_size=8, seed=0,
                                                 process_index=0, process_count=1)
    batch = next(clean)
    for row, index in enumerate(clean.local_indices(0, 0)):
        np.testing.assert_array_equal(batch["image"][row], transforms.clean_pixels(source[index]["image"], 8))
        assert batch["label"][row] == index
    batch = next(augmented)
    for row, index in enumerate(augmented.local_indices(0, 0)):
        rng = np.random.default_rng((0, 1, 0, int(index)))
        np.testing.assert_array_equal(batch["image"][row], transforms.augmented_pixels(source[index]["image"], 8, rng))
    orders = [s.global_indices(0, 0).tolist() + s.global_indices(0, 1).tolist() for s in (clean, augmented)]
    assert orders[0] != orders[1]
    assert clean.global_indices(0, 0).tolist() != clean.global_indices(1, 0).tolist()  # a new shuffle each epoch


def test_restart_at_step_n_yields_the_same_batches():
    source = _source(14)
    reference = pipeline.BatchStream(source, global_batch_size=4, image_size=6, view="augmented", seed=5,
                                     process_index=0, process_count=1)
    uninterrupted = [next(reference) for _ in range(8)]  # 3 batches per epoch: crosses two epoch ends
    for n in (0, 2, 3, 5):
        first = pipeline.BatchStream(source, global_batch_size=4, image_size=6, view="augmented", seed=5,
                                     process_index=0, process_count=1, num_threads=2)
        for _ in range(n):
            next(first)
        saved = json.loads(json.dumps(first.get_state()))
        resumed = pipeline.BatchStream(source, global_batch_size=4, image_size=6, view="augmented", seed=5,
                                       process_index=0, process_count=1, num_threads=3)
        resumed.set_state(saved)
        for expected in uninterrupted[n:]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], expected["image"])
            np.testing.assert_array_equal(got["label"], expected["label"])
    assert reference.get_state() == {"epoch": 2, "batch": 2}
    with pytest.raises(ValueError, match="outside"):
        reference.set_state({"epoch": 0, "batch": 3})


def test_bad_stream_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="does not divide by the 3 processes"):
        pipeline.BatchStream(_source(10), global_batch_size=4, image_size=6, view="clean", seed=0,
                             process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.BatchStream(_source(3), global_batch_size=4, image_size=6, view="clean", seed=0)
    with pytest.raises(ValueError, match="empty"):
        pipeline.BatchStream([], global_batch_size=4, image_size=6, view="clean", seed=0)
    with pytest.raises(ValueError, match="view"):
        pipeline.BatchStream(_source(8), global_batch_size=4, image_size=6, view="blurred", seed=0)


def test_missing_dataset_fails_at_once_naming_it_and_the_fix(tmp_path):
    for name in registry.DATASETS:
        start = time.perf_counter()
        with pytest.raises(registry.DataNotFoundError) as error:
            pipeline.open_split(name, "train", data_dir=str(tmp_path))
        assert time.perf_counter() - start < 1.0
        message = str(error.value)
        assert "\n" not in message and name in message and str(tmp_path) in message
        assert "prepare" in message or "copy" in message
    with pytest.raises(ValueError, match="unknown: use one of"):
        pipeline.open_split("imagenet22k", "train", data_dir=str(tmp_path))


def test_tfrecord_preparation_is_reported_with_the_conversion_command(tmp_path):
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
    with pytest.raises(registry.DataNotFoundError, match="prepared as tfrecord, which has no random access.*--convert"):
        pipeline.open_split("cifar10", "train", data_dir=str(tmp_path))


TFDS_OWN = [spec for spec in registry.DATASETS.values()
            if spec.tfds_name not in ("tiny_imagenet", "fashion_mnist_local", "sklearn_digits")]


@pytest.mark.parametrize("spec", TFDS_OWN, ids=lambda s: s.name)
def test_tfds_datasets_through_the_pipeline_with_mock_data(spec, tmp_path):
    version = str(tfds.builder_cls(spec.tfds_name).VERSION)
    marker = tmp_path / spec.tfds_name / version
    marker.mkdir(parents=True)
    (marker / "dataset_info.json").write_text("{}")  # what prepared_dir looks for; mock_data supplies examples
    with tfds.testing.mock_data(num_examples=8):
        train = pipeline.open_split(spec.name, spec.train_split, data_dir=str(tmp_path))
        test = pipeline.open_split(spec.name, spec.test_split, data_dir=str(tmp_path))
        clean, augmented = pipeline.training_streams(train, global_batch_size=4, image_size=16, seed=0)
        for batch in (next(clean), next(augmented), next(pipeline.eval_stream(test, global_batch_size=4, image_size=16))):
            assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
            assert batch["image"].max() > 0
            assert ((0 <= batch["label"]) & (batch["label"] < spec.num_classes)).all()


def test_class_subset_keeps_and_relabels_the_chosen_classes_in_order():
    source = _source(20)  # label = index % 5
    subset = pipeline.ClassSubset(source, classes=[3, 1], limit=6)
    assert len(subset) == 6
    assert [int(subset[i]["image"][0, 0, 0]) for i in range(6)] == [1, 3, 6, 8, 11, 13]
    assert [subset[i]["label"] for i in range(6)] == [1, 0, 1, 0, 1, 0]


@pytest.mark.slow  # prepares the real Fashion-MNIST (the session fixture)
def test_label_scan_and_class_subset_on_real_fashion_mnist(fashion_data_dir):
    labels = pipeline.read_labels("fashion_mnist", "test", fashion_data_dir)
    source = pipeline.open_split("fashion_mnist", "test", fashion_data_dir)
    assert len(labels) == len(source) == 10_000
    assert [int(source[i]["label"]) for i in range(50)] == labels[:50].tolist()
    subset = pipeline.open_subset("fashion_mnist", "test", fashion_data_dir, classes=(9, 5), limit=30)
    expected = [i for i, label in enumerate(labels) if label in (9, 5)][:30]
    assert len(subset) == 30
    assert [subset[i]["label"] for i in range(30)] == [0 if labels[i] == 9 else 1 for i in expected]
    np.testing.assert_array_equal(subset[3]["image"], source[expected[3]]["image"])
