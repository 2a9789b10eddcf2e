"""Files at a local path or a storage URI (s3://, gs://, file://, hf://...); a path without "://" is local and made absolute."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

# Schemes pyarrow.fs opens itself (as Ray does); any other scheme (hf://, memory://, ...) goes through fsspec.
NATIVE_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})

FileSystem = pafs.FileSystem  # what filesystem() returns: for type hints, and for readers/writers taking `filesystem=`


def absolute(uri: str) -> str:
    """A local path made absolute (`~` expanded); a URI unchanged. Ray workers may run in another directory."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path on it) of a local path or a URI."""
    uri = absolute(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if not scheme or scheme in NATIVE_SCHEMES:
        return pafs.FileSystem.from_uri(uri)
    try:
        import fsspec  # only for the schemes pyarrow lacks

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{uri}: no filesystem for {scheme}:// ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """`uri/part/...`, with no doubled slashes; a local path stays as given (relative or not)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def exists(uri: str) -> bool:
    """Whether a file or a folder is at `uri`."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_folder(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def open_input(uri: str) -> pa.NativeFile:
    """The file as a binary, seekable stream (Parquet readers need to seek); close it after use.

    A missing file raises FileNotFoundError naming `uri`; any other failure (no network, no access) its own error.
    """
    fs, path = filesystem(uri)
    try:
        if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
            # fsspec opened directly: FSSpecHandler.open_input_file reports every failure as "not found"
            return pa.PythonFile(fs.handler.fs.open(path, mode="rb"), mode="r")
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file", uri) from None


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write the file atomically: into `<name>.<random>.tmp` beside it, then moved over `<name>`.

    Readers see the old content or the new, never a part; a failed write leaves the old file as it was.
    Missing parent folders are created.
    """
    fs, path = filesystem(uri)
    parent = path.rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"  # unique: two writers of one file never share a temporary
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    """write_bytes of the encoded text: atomic."""
    write_bytes(uri, text.encode(encoding))


def delete(uri: str) -> None:
    """Delete the file at `uri`; nothing to do when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_folder(uri: str) -> None:
    """Delete the folder `uri` and everything under it; nothing to do when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """The files under the folder `uri` (recursively) whose names end with `suffix`, as paths relative to it,
    sorted; [] when there is no such folder."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        i.path[len(root) + 1 :]
        for i in infos
        if i.type == pafs.FileType.File and i.path.startswith(f"{root}/") and i.path.endswith(suffix)
    )


def copy_folder(src_uri: str, dst_uri: str) -> None:
    """Copy every file under the folder `src_uri` into the folder `dst_uri` (created when missing).

    A missing source raises FileNotFoundError naming `src_uri`.
    """
    src_fs, src = filesystem(src_uri)
    dst_fs, dst = filesystem(dst_uri)
    if src_fs.get_file_info(src).type != pafs.FileType.Directory:
        raise FileNotFoundError(errno.ENOENT, "no such folder", src_uri)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
