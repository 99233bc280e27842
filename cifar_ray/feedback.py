"""`cifar-ray feedback export`: labelled production images as training data.

    cifar-ray feedback export --from runs/payload_log --out data/feedback
    cifar-ray evaluate --checkpoint models:/cifar10-classifier@champion --data data/feedback
    cifar-ray train --data data/feedback ...

Reads the payload log (payload_log.py), keeps the answers whose image was logged
(`payload_log_images: true`) and whose true label came back through POST /feedback, and
writes them in the training data's schema (`image`: PNG bytes, `label`: int64), one row per
distinct image (by the SHA-256 of its pixels; the latest label wins), as a Parquet folder
that `--data` of every command reads.
"""

from __future__ import annotations

from cifar_ray.errors import DataSourceError


def labelled_images(log_path: str):
    """(pyarrow table of image, label, image_sha256; counts) from a payload log."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from cifar_ray.storage import filesystem

    fs, root = filesystem(log_path)
    try:
        table = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table(
            columns=["time", "kind", "request_id", "image_sha256", "image", "label"])
    except (FileNotFoundError, OSError):
        raise DataSourceError(f"--from {log_path}: no payload log there") from None
    answers = table.filter(pc.and_(pc.equal(table["kind"], "answer"), pc.is_valid(table["image"])))
    labels = table.filter(pc.equal(table["kind"], "feedback")).sort_by("time")
    label_of = dict(zip(labels["request_id"].to_pylist(), labels["label"].to_pylist()))  # the latest wins
    rows = {}
    for request_id, sha, image, time in zip(answers["request_id"].to_pylist(), answers["image_sha256"].to_pylist(),
                                            answers["image"].to_pylist(), answers["time"].to_pylist()):
        if request_id in label_of and (sha not in rows or rows[sha][2] <= time):
            rows[sha] = (image, label_of[request_id], time)
    counts = {"answers_logged": answers.num_rows, "feedback": labels.num_rows,
              "labelled_with_image": sum(r in label_of for r in answers["request_id"].to_pylist()),
              "images": len(rows)}
    import pyarrow as pa

    out = pa.table({"image": pa.array([r[0] for r in rows.values()], pa.binary()),
                    "label": pa.array([r[1] for r in rows.values()], pa.int64()),
                    "image_sha256": pa.array(list(rows), pa.string())})
    return out, counts


def export(log_path: str, out: str) -> dict:
    """Write the labelled images of `log_path` under `out` (part-000.parquet); the counts."""
    import pyarrow.parquet as pq

    from cifar_ray.storage import filesystem

    table, counts = labelled_images(log_path)
    if table.num_rows == 0:
        raise DataSourceError(f"--from {log_path}: no logged image has feedback yet ({counts['answers_logged']} "
                              f"answers with images, {counts['feedback']} feedback labels); images are logged "
                              "with payload_log_images: true")
    fs, root = filesystem(out)
    fs.create_dir(root, recursive=True)
    pq.write_table(table, f"{root.rstrip('/')}/part-000.parquet", filesystem=fs)
    return counts


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import parse_args, run_cli

    args = parse_args("feedback", argv, prog)

    def run() -> None:
        counts = export(args.source, args.out)
        print(f"wrote {counts['images']} labelled images to {args.out} ({counts['labelled_with_image']} labelled "
              f"answers with their image, {counts['feedback']} feedback labels, "
              f"{counts['labelled_with_image'] - counts['images']} repeated images)")

    run_cli(run)


if __name__ == "__main__":
    main()
