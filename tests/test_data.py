"""Data: augmentation (pure numpy) and the Ray Data sources, decode and split."""

import io

import numpy as np
import pytest

from conftest import encode, make_images, unusual_images, write_image_folder, write_parquet_folder
from cifar_ray.config import DataConfig
from cifar_ray.augment import augment_batch, crop_flip, notebook_augment
from cifar_ray.data import load_training_data, read_source
from cifar_ray.errors import DataSourceError
from cifar_ray.images import decode_batch, decode_image


@pytest.fixture
def images():
    return make_images(16, seed=3)[0]


def test_crop_flip_outputs_are_crops_of_the_padded_image(images):
    out = crop_flip(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    for i in range(len(images)):
        candidates = [c for top in range(9) for left in range(9)
                      for c in (padded[i, top:top + 32, left:left + 32],
                                padded[i, top:top + 32, left:left + 32][:, ::-1])]
        assert any(np.array_equal(out[i], c) for c in candidates)


def test_notebook_augment_without_geometry_only_flips(images):
    out = notebook_augment(images, np.random.default_rng(0), rotation=0, shift=0, zoom=0)
    for original, result in zip(images, out):
        assert np.array_equal(result, original) or np.array_equal(result, original[:, ::-1])
    assert not np.array_equal(out, images)  # some of 16 images were flipped


@pytest.mark.parametrize("mode", ["crop_flip", "notebook"])
def test_augmentation_changes_pixels_keeps_labels_and_differs_each_draw(images, mode):
    labels = np.arange(len(images))
    first = augment_batch({"image": images, "label": labels}, mode)
    second = augment_batch({"image": images, "label": labels}, mode)
    assert np.array_equal(first["label"], labels)
    assert np.mean(first["image"] != images) > 0.3
    assert not np.array_equal(first["image"], second["image"])


@pytest.mark.parametrize("kind", sorted(unusual_images()))
def test_unusual_images_decode_as_a_browser_shows_them(kind):
    data, expected = unusual_images()[kind]
    np.testing.assert_array_equal(decode_image(data, resize=True), expected)


def test_a_cmyk_jpeg_decodes_to_rgb():
    from PIL import Image

    image = make_images(1, seed=4)[0][0]
    buffer = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(buffer, "JPEG", quality=95)
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (32, 32, 3) and np.abs(decoded.astype(int) - image).mean() < 8  # lossy JPEG


def test_decode_rejects_bad_rows():
    image = make_images(1)[0][0]
    with pytest.raises(DataSourceError, match="out of range"):
        decode_batch({"image": [encode(image)], "label": np.array([10])})
    with pytest.raises(DataSourceError, match="undecodable"):
        decode_batch({"image": [b"not an image"], "label": np.array([1])})
    with pytest.raises(DataSourceError, match="expected 32x32"):
        decode_batch({"image": [encode(np.zeros((31, 32, 3), np.uint8))], "label": np.array([1])})
    with pytest.raises(DataSourceError, match="empty image"):
        decode_batch({"image": [b""], "label": np.array([1])})


def test_decode_can_flag_bad_rows_instead(capsys):
    image = make_images(1)[0][0]
    batch = {"image": [encode(image), b"\x89PNG truncated", encode(image)], "label": np.array([3, 1, 12])}
    out = decode_batch(batch, skip_bad_rows=True)
    assert out["ok"].tolist() == [True, False, False]
    assert np.array_equal(out["image"][0], image) and out["label"][0] == 3
    assert capsys.readouterr().err.count("skipping bad row") == 2


def corrupt_parquet(tmp_path, n=30):
    """A two-file Parquet source whose second file has a truncated image at row 4 and
    label 11 at row 9 (rows counted from 0 within the file)."""
    import pyarrow.parquet as pq

    images, labels = make_images(n)
    root = write_parquet_folder(tmp_path / "pq", images, labels)
    path = root / "part-001.parquet"
    table = pq.read_table(path).to_pydict()
    table["image"][4] = table["image"][4][:40]
    table["label"][9] = 11
    pq.write_table(pa_table(table), path)
    return root, path


def pa_table(columns: dict):
    import pyarrow as pa

    return pa.table({"image": pa.array(columns["image"], pa.binary()),
                     "label": pa.array(columns["label"], pa.int64())})


def test_bad_parquet_row_is_named_by_file_and_row(ray_cluster, tmp_path):
    root, path = corrupt_parquet(tmp_path)
    with pytest.raises(Exception) as caught:
        load_training_data(DataConfig(data=str(root), val_fraction=0.2), seed=0)
    from cifar_ray.errors import find_user_error

    message = str(find_user_error(caught.value))
    assert f"{path} row 4" in message or f"{path} row 9" in message, message
    assert "--skip-bad-rows" in message


def test_skip_bad_rows_counts_and_skips_them(ray_cluster, tmp_path):
    root, _ = corrupt_parquet(tmp_path)
    train, val, holdout, info = load_training_data(DataConfig(data=str(root), val_fraction=0.2,
                                                           skip_bad_rows=True), seed=0)
    assert info.skipped_rows == 2
    assert train.count() + val.count() + holdout.count() == 28
    assert set(train.columns()) == {"image", "label"}


def test_empty_source_and_missing_column_are_one_line_errors(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty").mkdir()
    pq.write_table(pa_table({"image": [], "label": []}), tmp_path / "empty" / "part-0.parquet")
    with pytest.raises(DataSourceError, match="no images"):
        load_training_data(DataConfig(data=str(tmp_path / "empty")), seed=0)

    (tmp_path / "nolabel").mkdir()
    pq.write_table(pa.table({"image": [encode(make_images(1)[0][0])], "class": [1]}),
                   tmp_path / "nolabel" / "part-0.parquet")
    with pytest.raises(DataSourceError, match=r"missing column\(s\) label \(found image, class\)"):
        read_source(str(tmp_path / "nolabel"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or folder"):
        read_source(str(tmp_path / "missing"))


def test_sources_share_one_schema_and_lossless_pixels(ray_cluster, tmp_path):
    images, labels = make_images(40)
    sources = {
        "synthetic": "synthetic",
        "parquet": str(write_parquet_folder(tmp_path / "pq", images, labels)),
        "folder": str(write_image_folder(tmp_path / "img", images, labels)),
    }
    for name, spec in sources.items():
        batch = read_source(spec, synthetic_size=40).take_batch(40, batch_format="numpy")
        assert batch["image"].shape == (40, 32, 32, 3), name
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int64, name
        if name != "synthetic":  # PNG is lossless: the very pixels come back, with their labels
            got = {encode(img): lab for img, lab in zip(batch["image"], batch["label"])}
            assert got == {encode(img): lab for img, lab in zip(images, labels)}, name


def test_split_is_disjoint_complete_and_seeded(ray_cluster):
    cfg = DataConfig(data="synthetic", synthetic_size=200, val_fraction=0.2)

    def split(seed):
        train, val, holdout, info = load_training_data(cfg, seed=seed)
        return image_keys(train), image_keys(val), image_keys(holdout), info

    train, val, holdout, info = split(seed=0)
    assert not train & val and not (train | val) & holdout and len(train | val | holdout) == 200
    assert (info.num_train, info.num_val, info.num_holdout) == (len(train), len(val), len(holdout))
    assert abs(len(val) - 0.2 * (200 - len(holdout))) <= 1
    assert split(seed=0)[1] == val
    assert split(seed=1)[1] != val
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


def test_split_follows_the_images_not_their_order(ray_cluster, tmp_path):
    """Parallel reads hand rows over in a different order from run to run: a rerun (a resumed
    run) must still validate on the same images and, with --limit, train on the same ones."""
    images, labels = make_images(240, seed=5)
    order = np.random.default_rng(0).permutation(len(images))
    splits = []
    for name, rows in (("as-is", np.arange(len(images))), ("shuffled", order)):
        root = str(write_parquet_folder(tmp_path / name, images[rows], labels[rows], parts=3))
        train, val, holdout, _ = load_training_data(DataConfig(data=root, val_fraction=0.25, limit=100), seed=3)
        splits.append((image_keys(train), image_keys(val), image_keys(holdout)))
    assert splits[0] == splits[1]
    train, val, _ = splits[0]
    assert len(train) == 100 and not train & val


def test_limit_caps_training_images_only(ray_cluster):
    train, val, holdout, info = load_training_data(DataConfig(data="synthetic", synthetic_size=200,
                                                           val_fraction=0.1, limit=50), seed=0)
    assert (train.count(), info.num_train) == (50, 50)
    assert abs(val.count() - 0.1 * (200 - holdout.count())) <= 1


def image_keys(ds) -> set:
    return {encode(x) for x in ds.take_batch(10_000)["image"]}


def test_holdout_is_the_same_images_whatever_seed_limit_and_val_fraction(ray_cluster, tmp_path):
    """The registry's fixed evaluation set: chosen by pixel hash, never in train or val."""
    images, labels = make_images(300, seed=3)
    root = str(write_parquet_folder(tmp_path / "pq", images, labels))
    holdouts, fingerprints = [], set()
    for seed, val_fraction, limit in ((0, 0.1, None), (7, 0.3, 50)):
        train, val, holdout, info = load_training_data(
            DataConfig(data=root, val_fraction=val_fraction, limit=limit), seed=seed)
        holdouts.append(image_keys(holdout))
        fingerprints.add(info.fingerprint)
        assert not holdouts[-1] & (image_keys(train) | image_keys(val))
    assert holdouts[0] == holdouts[1]
    assert len(fingerprints) == 1  # the source's fingerprint does not depend on how it is split
    assert 5 <= len(holdouts[0]) <= 30  # about 1 in 20 of 300


def test_fast_resnets_first_layer_whitens_the_training_patches(ray_cluster):
    """compute_patch_covariance (split) and the whitening layer (models) agree on patch layout:
    on correlated images, the layer's linear outputs (its bias starts at 0) have (near)
    identity covariance."""
    import ray.data

    import keras
    from cifar_ray.split import compute_normalization, compute_patch_covariance
    from cifar_ray.models import fast_resnet

    rng = np.random.default_rng(0)
    noise = rng.normal(size=(300, 33, 33, 1))
    smooth = noise[:, 1:, 1:] + noise[:, :-1, :-1] + 0.5 * rng.normal(size=(300, 32, 32, 3))
    images = np.clip(128 + 30 * smooth, 0, 255).astype("uint8")  # neighbours and channels correlated
    ds = ray.data.from_items([{"image": img, "label": 0} for img in images])
    mean, std = compute_normalization(ds)
    covariance = np.array(compute_patch_covariance(ds, mean, std))
    # patches flatten as (row, column, channel): red (0,0) vs green (0,0) and red (1,1)
    assert covariance.shape == (12, 12) and covariance[0, 1] > 0.3 and covariance[0, 9] > 0.3
    assert abs(covariance[0, 3]) < 0.1  # red (0,1): the noise correlates only along the diagonal

    model = fast_resnet(mean, std, covariance)
    whitening = model.get_layer("whitening")
    assert [w.path for w in whitening.trainable_weights] == ["whitening/bias"]  # the kernel is frozen
    outputs = np.asarray(keras.Model(model.input, whitening.output)(images)).reshape(-1, 24)
    whitened = np.cov(outputs[:, :12], rowvar=False)
    np.testing.assert_allclose(whitened, np.eye(12), atol=0.05)
    np.testing.assert_allclose(outputs[:, 12:], -outputs[:, :12], atol=1e-5)  # both signs kept


def test_the_training_split_comes_in_a_new_order_every_epoch(ray_cluster):
    import ray.data

    from cifar_ray.data import shuffle_every_epoch

    shuffled = shuffle_every_epoch(ray.data.range(2000, override_num_blocks=1).materialize())
    orders = [tuple(row["id"] for row in shuffled.iter_rows()) for _ in range(3)]
    assert len(set(orders)) == 3
    assert all(sorted(order) == list(range(2000)) for order in orders)
