"""Image sources on disk: a local folder of images and a WebDataset tar set, read without
extracting anything (tar members are read in memory) and without leaving the folder.

- a folder: class sub-folders with any names (``7/a.png``, ``tabby cat/b.jpg``; integer
  names are labels, other names class names -- ``tasks/data/survey.py``), or a
  ``captions.jsonl`` with one ``{"file", "label", "caption", "attributes"}`` object per
  line: ``label`` an int or a class name, optional when ``caption`` is given (a
  caption-only item), ``attributes`` an object whose numeric values are kept;
- a WebDataset tar set: a ``.tar`` path, a folder of ``.tar`` files, or a glob / brace
  pattern of them (samples need an image member and a label in ``cls``/``label``/
  ``json["label"]``, or a caption in ``txt``/``json["caption"]``; ``json["attributes"]``
  gives numeric attributes).

Tar members with absolute names, ``..`` components or link types, symlinks that resolve
outside the source folder, and non-image files become :class:`~condgen.tasks.data.items.Reject`
items with a reason. Which source a spec names is ``tasks/data/sources.py``.

Bounds, checked before bytes are held: a folder file or tar member over 16 MiB is
``too_large``; a tar sample (the consecutive members of one key) with more members or bytes
than ``settings.ingest_sample_limits()`` (16, 32 MiB) is ``sample_too_large`` and the rest
of its members are skipped unread; a ``captions.jsonl`` line over ``MAX_RECORD_BYTES`` is
``record_too_long`` (the file is read line by line, never whole).

One file, one sample: a folder file reached a second time -- through a symlink, a hard link
or a repeated ``captions.jsonl`` line -- is rejected as ``duplicate_file`` (the first
reference in walk order, or the first line, wins), so no image is ingested twice. A label
read from a ``cls``/``label`` member loses one trailing newline (``7\n`` as ``echo`` writes
it); the label itself must then be exact (``tasks/data/items.py``).
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from condgen.tasks.data.items import (
    IMAGE_EXTS,
    MAX_MEMBER_BYTES,
    BadItem,
    RawItem,
    Reject,
    Source,
    sha256_of,
    unsafe_name,
)
from condgen.tasks.io import settings

LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
CAPTION_EXTS = ("txt", "caption", "caption.txt")
MAX_RECORD_BYTES = 64 * 1024  # one captions.jsonl line: a 2,000-character caption and attributes fit


# local folder ----------------------------------------------------------------------


def folder_source(root: Path, tag: str) -> Source:
    root = root.resolve()
    return Source(tag, lambda: _folder_fingerprint(root), lambda: _folder_items(root))


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, relative posix name) of every entry to consider, in a fixed order.

    Symlinked directories are yielded (not entered): following them could loop or
    leave the folder; they are rejected as items.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        linked = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + linked):
            path = base / name
            yield path, path.relative_to(root).as_posix()


def _folder_fingerprint(root: Path) -> str:
    def chunks() -> Iterator[bytes]:
        for path, rel in _walk(root):
            yield rel.encode() + b"\0"
            if path.is_symlink():
                yield b"->" + os.readlink(path).encode() + b"\0"  # never read through links
            elif path.is_file():
                yield path.read_bytes()
    return sha256_of(chunks())


def _folder_items(root: Path) -> Iterator[RawItem | Reject]:
    if (root / "captions.jsonl").is_file():
        yield from _captioned_items(root)
    else:
        yield from _class_folder_items(root)


def _class_folder_items(root: Path) -> Iterator[RawItem | Reject]:
    seen: dict[tuple[int, int], str] = {}
    for path, rel in _walk(root):
        parts = rel.split("/")
        try:
            data = _read_inside(root, path, rel, seen)
        except BadItem as exc:
            yield Reject(rel, exc.reason, exc.detail)
            continue
        # A file at the top level has no class folder, hence no label.
        yield RawItem(ref=rel, label=parts[0] if len(parts) > 1 else None, data=data)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each line, read one at a time; text None for a line over
    ``MAX_RECORD_BYTES`` (skipped without holding it)."""
    with open(path, "rb") as f:
        for lineno in range(1, 1 << 62):
            line = f.readline(MAX_RECORD_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                yield lineno, None
                continue
            yield lineno, line.decode("utf-8", errors="replace")


def _captioned_items(root: Path) -> Iterator[RawItem | Reject]:
    seen: dict[tuple[int, int], str] = {}
    for lineno, line in _jsonl_lines(root / "captions.jsonl"):
        ref = f"captions.jsonl:{lineno}"
        if line is None:
            yield Reject(ref, "record_too_long", f"over {MAX_RECORD_BYTES} bytes")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                raise BadItem("bad_record", "needs an object with a 'file' string")
            rel = rec["file"]
            ref = rel
            if unsafe_name(rel):
                raise BadItem("unsafe_path", rel[:200])
            data = _read_inside(root, root / rel, rel, seen, by=f"captions.jsonl:{lineno}")
        except json.JSONDecodeError:
            yield Reject(ref, "bad_record", "not JSON")
            continue
        except BadItem as exc:
            yield Reject(ref, exc.reason, exc.detail)
            continue
        caption = rec.get("caption") if isinstance(rec.get("caption"), str) else None
        yield RawItem(ref=rel, label=rec.get("label"), data=data, caption=caption,
                      attributes=rec.get("attributes") if isinstance(rec.get("attributes"), dict) else None)


def _read_inside(root: Path, path: Path, rel: str, seen: dict[tuple[int, int], str], by: str = "") -> bytes:
    """Bytes of an image file that really lies inside ``root`` (symlinks resolved) and was not
    read before (``seen``: (device, inode) -> the first reference to it, which ``by`` names)."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise BadItem("symlink_escape" if path.is_symlink() or _has_link(root, path) else "unsafe_path",
                      rel[:200])
    if path.is_symlink() and real.is_dir():
        raise BadItem("symlink_dir", "symlinked folders are not followed")
    if not real.is_file():
        raise BadItem("not_a_file", rel[:200])
    if rel.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS or "." not in rel.rsplit("/", 1)[-1]:
        raise BadItem("not_an_image", rel[:200])
    stat = real.stat()
    if stat.st_size > MAX_MEMBER_BYTES:
        raise BadItem("too_large", f"{stat.st_size} bytes")
    first = seen.setdefault((stat.st_dev, stat.st_ino), by or rel)
    if first != (by or rel):
        raise BadItem("duplicate_file", f"same file as {first[:200]}")
    return real.read_bytes()


def _has_link(root: Path, path: Path) -> bool:
    p = path
    while p != root and p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False



# WebDataset tars ---------------------------------------------------------------------


def is_tar_layout(names: Sequence[str]) -> bool:
    """A WebDataset set: .tar files and no loose images (manifests/indexes may sit beside)."""
    exts = [n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]]
    return "tar" in exts and not any(e in IMAGE_EXTS for e in exts)


def tar_only_dir(path: Path) -> bool:
    return not any(p.is_dir() for p in path.iterdir()) and is_tar_layout([p.name for p in path.iterdir()])


def expand_tar_pattern(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    found: dict[str, None] = {}
    for expanded in braceexpand(pattern):
        for match in sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]:
            if Path(match).is_file():
                found[match] = None
    if not found:
        raise FileNotFoundError(f"no tar files match {pattern!r}")
    return [Path(p) for p in found]


def tar_source(tars: list[Path], tag: str, limits: tuple[int, int] | None = None) -> Source:
    """A WebDataset tar set; ``limits`` (members, bytes) of one sample, default the settings'."""
    max_members, max_bytes = limits or settings.ingest_sample_limits()

    def fingerprint() -> str:
        def chunks() -> Iterator[bytes]:
            for t in tars:
                yield t.name.encode() + b"\0"
                with open(t, "rb") as f:
                    yield from iter(lambda: f.read(1 << 20), b"")
        return sha256_of(chunks())

    def items() -> Iterator[RawItem | Reject]:
        for t in tars:
            yield from _tar_items(t, max_members, max_bytes)

    return Source(tag, fingerprint, items)


def _tar_items(path: Path, max_members: int, max_bytes: int) -> Iterator[RawItem | Reject]:
    """Stream one tar; consecutive members with the same key form a sample (webdataset).

    A sample's size is checked on each member's header before its bytes are read: one over
    ``max_members`` members or ``max_bytes`` bytes is rejected and its other members skipped
    unread, so memory stays under ``max_bytes`` whatever the tar holds.
    """
    key: str | None = None
    group: dict[str, bytes] = {}
    n_members = n_bytes = 0
    refused: str | None = None  # the key of a sample rejected as too large
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                reject, parsed = _check_member(path.name, member)
                if reject is not None:
                    yield reject
                if reject is not None or parsed is None:  # parsed None: directories, webdataset metadata
                    _drain(tar, member)
                    continue
                mkey, ext = parsed
                if mkey != key:
                    if group:
                        yield _tar_sample(path.name, key or "", group)
                    group, n_members, n_bytes, refused = {}, 0, 0, None
                key = mkey
                if refused == mkey:
                    _drain(tar, member)  # the rest of a sample already rejected: never held
                    continue
                n_members, n_bytes = n_members + 1, n_bytes + member.size
                if n_members > max_members or n_bytes > max_bytes:
                    what = f"more than {max_members} members" if n_members > max_members else \
                        f"more than {max_bytes} bytes"
                    yield Reject(f"{path.name}:{mkey}", "sample_too_large", what)
                    group, refused = {}, mkey
                    _drain(tar, member)
                    continue
                fobj = tar.extractfile(member)
                group[ext.lower()] = fobj.read() if fobj is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Reject(path.name, "corrupt_tar", type(exc).__name__)
    if group:
        yield _tar_sample(path.name, key or "", group)


def _drain(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """Read past a member's data in 1 MiB chunks, holding none of it. (Left to ``tarfile``, a
    stream skips it 10 KiB at a time: ten times slower through gzip.)"""
    fobj = tar.extractfile(member) if member.isreg() else None
    if fobj is not None:
        while fobj.read(1 << 20):
            pass


def _check_member(tar_name: str, m: tarfile.TarInfo) -> tuple[Reject | None, tuple[str, str] | None]:
    ref = f"{tar_name}:{m.name}"
    if unsafe_name(m.name):
        return Reject(ref, "unsafe_member_name", m.name[:200]), None
    if m.isdir():
        return None, None
    if m.issym() or m.islnk():
        return Reject(ref, "link_member", m.linkname[:200]), None
    if not m.isreg():
        return Reject(ref, "special_member"), None
    if m.size > MAX_MEMBER_BYTES:
        return Reject(ref, "too_large", f"{m.size} bytes"), None
    name = m.name.removeprefix("./")
    if name.rsplit("/", 1)[-1].startswith("__"):
        return None, None  # webdataset metadata such as __index__
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)  # webdataset's base_plus_ext
    if not match:
        return Reject(ref, "not_an_image", "no extension"), None
    return None, (match.group(1), match.group(2))


def _tar_sample(tar_name: str, key: str, group: dict[str, bytes]) -> RawItem | Reject:
    ref = f"{tar_name}:{key}"
    image_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if image_ext is None:
        return Reject(ref, "not_an_image", "members: " + ",".join(sorted(group))[:200])
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            loaded = json.loads(group["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}  # only needed for label/caption fallbacks; missing ones reject below
    label = next((_line(group[e]) for e in LABEL_EXTS if e in group), meta.get("label"))
    caption = next((group[e].decode("utf-8", "replace") for e in CAPTION_EXTS if e in group), meta.get("caption"))
    attrs = meta.get("attributes")
    return RawItem(ref=f"{ref}.{image_ext}", label=label, data=group[image_ext],
                   caption=caption if isinstance(caption, str) else None,
                   attributes=attrs if isinstance(attrs, dict) else None)


def _line(data: bytes) -> str:
    """A text member as one value: UTF-8, less one trailing newline (as ``echo 7 > x.cls`` writes)."""
    return data.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
