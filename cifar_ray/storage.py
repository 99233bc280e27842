"""Files in a local folder or behind a URI (s3://, gs://, anything pyarrow.fs opens), alike.

Run folders, checkpoints, reports and predictions may live on a laptop's disk or in an
object store; every module reads, writes, lists and copies through here, and this module
alone decides which a path is (`is_uri`).
"""

from __future__ import annotations

import os
from pathlib import Path


def is_uri(path: str) -> bool:
    """A URI (scheme://...) rather than a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (Ray and pyarrow need one); a URI as it is."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def filesystem(path: str) -> tuple:
    """(pyarrow file system, path within it) for a local path or a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(absolute(path))


def read_file(directory: str, name: str) -> bytes:
    if not is_uri(directory):
        return (Path(directory) / name).read_bytes()
    fs, path = filesystem(f"{directory.rstrip('/')}/{name}")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_file(directory: str, name: str, data: bytes) -> None:
    """Write `name` into `directory`, creating the folder.

    A reader never sees half a file: locally the bytes go to a hidden file beside it, which
    is then renamed over it (an interrupted write leaves the old file as it was); an object
    store's upload appears whole or not at all.
    """
    import pyarrow.fs

    fs, path = filesystem(directory)
    fs.create_dir(path, recursive=True)
    final = f"{path.rstrip('/')}/{name}"
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        with fs.open_output_stream(final) as out:
            out.write(data)
        return
    aside = f"{path.rstrip('/')}/.{name}.{os.getpid()}.tmp"
    try:
        with fs.open_output_stream(aside) as out:
            out.write(data)
        fs.move(aside, final)
    except BaseException:
        if fs.get_file_info(aside).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(aside)
        raise


def subfolders(directory: str, prefix: str) -> tuple:
    """(file system, infos of the folders in `directory` whose names start with `prefix`);
    none when `directory` does not exist."""
    import pyarrow.fs

    fs, path = filesystem(directory)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return fs, [i for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix)]


def copy_folder(source: str, destination: str) -> None:
    """Copy the files of folder `source` into `destination` (a local download of a URI, too)."""
    import pyarrow.fs

    fs, path = filesystem(destination)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(absolute(source), absolute(destination))


def replace_folder(source: str, destination: str) -> None:
    """Make `destination` a copy of the folder `source` (what it held before is deleted)."""
    fs, path = filesystem(destination)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    copy_folder(source, destination)


def check_writable(directory: str, flag: str = "--storage-path") -> None:
    """Fail before the work, not after an hour of it, when results could not be saved."""
    probe = f"{absolute(directory).rstrip('/')}/.cifar-ray-write-test"
    try:
        fs, path = filesystem(probe)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(b"ok")
        fs.delete_file(path)
    except Exception as e:
        raise PermissionError(f"{flag} {directory} is not writable ({e})") from None
