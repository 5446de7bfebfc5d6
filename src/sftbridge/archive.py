"""Safe extraction of downloaded archives (a SageMaker job's ``model.tar.gz``) and safe download paths.

An archive from elsewhere is untrusted input: a member named ``/etc/x`` or ``../x``, or a link that points
out of the destination, could write anywhere on this machine. Every member is checked before anything is
written, and the whole archive is refused if one of them is unsafe.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path, PurePosixPath

from sftbridge.errors import RunDirError


def safe_relative(name: str, *, what: str) -> PurePosixPath:
    """``name`` as a relative path that stays inside its destination; RunDirError otherwise.

    Args:
        name: a member name or object key, with ``/`` separators.
        what: where ``name`` comes from, for the error message (e.g. ``"model.tar.gz member"``).
    """
    normalized = posixpath.normpath(name.replace("\\", "/")) if name else ""
    path = PurePosixPath(normalized)
    if (
        not normalized
        or normalized == "."
        or path.is_absolute()
        or ".." in path.parts
        or (path.parts and ":" in path.parts[0])  # a Windows drive, C:...
    ):
        raise RunDirError(f"{what} {name!r}: unsafe path (absolute, empty or with '..'); refusing it")
    return path


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    what = f"{archive.name} member"
    path = safe_relative(member.name, what=what)
    if member.isfile() or member.isdir():
        return
    if member.issym() or member.islnk():
        # A symlink resolves relative to its own folder; a hard link names another member.
        base = path.parent if member.issym() else PurePosixPath(".")
        if posixpath.isabs(member.linkname):
            raise RunDirError(f"{what} {member.name!r}: link to an absolute path {member.linkname!r}")
        target = posixpath.normpath(str(base / member.linkname))
        if target == ".." or target.startswith("../"):
            raise RunDirError(
                f"{what} {member.name!r}: link to {member.linkname!r} points outside the destination"
            )
        return
    raise RunDirError(f"{what} {member.name!r}: not a file, folder or link (device, fifo...); refusing it")


def check_whole(archive: Path) -> None:
    """Read a gzipped archive to its end, so that gzip checks its CRC and length: tarfile stops at a garbled
    header in the middle as if at the end of the archive, and would hand over a truncated, damaged run as
    whole. RunDirError if the stream is damaged."""
    import gzip
    import zlib

    with archive.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            return  # not gzipped: tar's own header checksums are all there is
    try:
        with gzip.open(archive, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise RunDirError(
            f"{archive}: damaged ({exc}); download it again (sftbridge fetch JOB) before using any of it"
        ) from None


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a (gzipped) tar into ``dest`` after checking the whole stream and every member; returns
    ``dest``.

    Raises RunDirError naming a damaged archive or the first unsafe member; nothing is extracted then.
    """
    archive, dest = Path(archive), Path(dest)
    check_whole(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4/3.10.12: the stdlib checks again
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; every member was checked above
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError) as exc:
        raise RunDirError(f"{archive}: not a readable tar archive ({exc})") from None
    return dest
