"""Teacher-output cache: off-policy teacher hidden states on disk, reused on later epochs and reruns.

Design:
- Entries are PER SAMPLE and content-addressed: the key is a sha256 of the sample's real token ids and of its
  loss mask at the target positions (``loss_mask[1:]``), never of its dataset row id. A sample's rows at its
  prediction positions depend only on its own tokens (causal attention within the sample), so a later epoch that
  groups the samples into other micro-batches, or packs them, still hits, and a changed data row simply misses.
  A micro-batch's output is the concatenation of its samples' rows in the micro-batch's sample order: the row
  convention of ``kdscale.data.batch`` (per sample, ``hidden[:-1][loss_mask[1:]]`` over its real tokens).
- One directory per teacher and transport dtype: ``<root>/<teacher_fingerprint[:16]>-<transport_dtype>/`` with
  ``manifest.json`` (format version, full teacher fingerprint, teacher description, transport dtype, hidden size,
  fingerprints of the data files that wrote into it, times) and ``entries/<key[:2]>/<key>.npy`` ([rows, H], int16
  bf16 bits or float32). A changed teacher gets a new directory (and a log line pointing at the old ones); a
  manifest that disagrees with what the run expects is a ValueError naming the directory and the fix.
- Writes are safe with several teacher replicas writing at once: an entry is written to a temporary name in its
  final directory, then hard-linked into place, which fails if the entry exists (an existing entry is never
  rewritten; readers that mapped it are never disturbed). The manifest is rewritten under an ``flock`` by
  re-reading and merging the data fingerprints, then written to a temporary name and renamed; on a filesystem
  without working ``flock`` two drivers opening at the same instant can lose one data fingerprint (it is
  informational only: entries are keyed by content, never by the data file).
- Costs: ``lookup`` is one ``stat`` per sample on the driver; a hit is read by each consuming rank with
  ``np.load(mmap_mode="r")``: zero-copy for a one-sample micro-batch, one concatenation (a copy) otherwise.
  The cache root must be on a filesystem that the driver, the teacher replicas and the student ranks all see
  (any local directory on one node; a shared filesystem across nodes).

Assumptions: the teacher is deterministic for given token ids (the bits cached are those of the first run that
computed the sample, whatever micro-batch it was in); ``teacher_fingerprint`` is a fast, partial hash of the
weights (see its docstring).

Usage (driver, teacher replica, student rank)::

    cache = TeacherOutputCache.open(root, teacher_fingerprint=fp, teacher_description=desc,
                                    transport_dtype="bfloat16", hidden_size=H, data_fingerprint=data_fp)
    ref = cache.lookup(micro_batch)          # driver: a CachedOutputRef, or None on a miss
    store_output(cache.spec, micro_batch, output)   # replica, after computing a miss
    ref.load()                               # consuming rank (the channel does it): a TeacherOutput
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdscale.data.batch import MicroBatch, sample_spans
from kdscale.observability.logging import get_logger
from kdscale.teacher.base import _TRANSPORT_DTYPES, TeacherOutput

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_EDGE_BYTES = 4 * 1024 * 1024  # bytes hashed at each end of a weight file
_CHUNK_BYTES = 16 * 1024 * 1024

logger = get_logger("kdscale.teacher.cache")


# ----------------------------------------------------------------------------------------------------------------
# fingerprints


def teacher_fingerprint(model_dir: str | os.PathLike[str], *, engine: str, settings: dict[str, Any]) -> str:
    """A sha256 (hex) that changes when the teacher's numerics change.

    Hashes config.json's bytes, the engine name, ``settings`` (the numerics-affecting options: dtype, attention
    implementation, ...; JSON with sorted keys) and, for every weight file (``*.safetensors``, ``*.bin``,
    ``*.gguf`` directly in ``model_dir``), its name, its size, the sha256 of its first and last 4 MiB and, for
    safetensors, its JSON header. It reads at most ~8 MiB per file, so it is fast for a 60 GB teacher, but it is
    NOT a full hash: weights edited in place with the same file size and the same first and last 4 MiB would not
    be detected; delete the cache (or set ``teacher_cache.enabled=false``) after such an edit.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"teacher model directory {str(model_dir)!r} does not exist; cannot fingerprint the teacher")
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(
            f"no weight files ({', '.join('*' + s for s in _WEIGHT_SUFFIXES)}) in {str(model_dir)!r}: cannot "
            f"fingerprint the teacher for the teacher-output cache; set teacher_cache.enabled=false"
        )
    digest = hashlib.sha256(b"kdscale-teacher-fingerprint-v1\0")
    config = model_dir / "config.json"
    _update_field(digest, config.read_bytes() if config.is_file() else b"<no config.json>")
    _update_field(digest, engine.encode())
    _update_field(digest, json.dumps(settings, sort_keys=True, default=str).encode())
    for path in weights:
        size = path.stat().st_size
        _update_field(digest, path.name.encode())
        _update_field(digest, str(size).encode())
        with path.open("rb") as f:
            if path.name.endswith(".safetensors") and size >= 8:
                (header_len,) = struct.unpack("<Q", f.read(8))
                _update_field(digest, f.read(min(header_len, size - 8)))
            f.seek(0)
            _update_field(digest, hashlib.sha256(f.read(_EDGE_BYTES)).digest())
            if size > _EDGE_BYTES:
                f.seek(max(size - _EDGE_BYTES, _EDGE_BYTES))
                _update_field(digest, hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def data_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a data file's bytes, streamed; for a directory, of its files' relative names and bytes."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256(b"kdscale-data-dir-v1\0")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            _update_field(digest, file.relative_to(path).as_posix().encode())
            _update_field(digest, bytes.fromhex(data_fingerprint(file)))
        return digest.hexdigest()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _update_field(digest: Any, data: bytes) -> None:
    """Length-prefixed update, so that field boundaries are unambiguous."""
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


# ----------------------------------------------------------------------------------------------------------------
# samples of a micro-batch (``sample_spans`` of kdscale.data.batch: padded rows, or packed segments)


def _sample_rows(micro_batch: MicroBatch) -> list[tuple[str, int]]:
    """``(key, num_rows)`` per sample, in output order; checks that the rows add up to the micro-batch's."""
    input_ids = micro_batch.input_ids.detach().cpu().numpy()
    target_mask = micro_batch.loss_mask.detach().cpu().numpy().astype(bool)
    out = []
    for row, start, stop in sample_spans(micro_batch):
        targets = target_mask[row, start + 1 : stop]  # prediction position p predicts token p + 1
        num_rows = int(targets.sum())
        if num_rows == 0:
            out.append(("", 0))
            continue
        digest = hashlib.sha256(b"kdscale-teacher-cache-sample-v1\0")
        _update_field(digest, input_ids[row, start:stop].astype("<i8").tobytes())
        _update_field(digest, targets.astype(np.uint8).tobytes())
        out.append((digest.hexdigest(), num_rows))
    total = sum(n for _, n in out)
    if total != micro_batch.num_loss_tokens:
        raise ValueError(
            f"the samples of this micro-batch have {total} prediction positions in total but its loss mask has "
            f"{micro_batch.num_loss_tokens}: in a packed micro-batch the loss mask must be False at each sample's "
            f"first token (its position_ids == 0)"
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# references and entries


@dataclass(frozen=True)
class CacheSpec:
    """Where a cache lives and what its entries hold; small and picklable (sent to replicas and ranks)."""

    path: str  # the teacher's cache directory (the one holding manifest.json)
    transport_dtype: str  # "bfloat16" (int16 bits) | "float32"
    hidden_size: int

    def entry_path(self, key: str) -> str:
        return os.path.join(self.path, "entries", key[:2], key + ".npy")


@dataclass(frozen=True)
class CachedOutputRef:
    """A micro-batch's teacher output in the cache: its samples' entry files, concatenated in order on ``load``.

    Routed to the consuming ranks like a Ray ObjectRef; the channel resolves both kinds.
    """

    files: tuple[str, ...]
    num_rows: tuple[int, ...]
    dtype: str  # "bfloat16" | "float32"
    hidden_size: int

    @property
    def nbytes(self) -> int:
        return sum(self.num_rows) * self.hidden_size * np.dtype(_TRANSPORT_DTYPES[self.dtype]).itemsize

    def load(self) -> TeacherOutput:
        """The output as a READ-ONLY TeacherOutput (one entry: a memory map of the file; several: a copy)."""
        np_dtype = np.dtype(_TRANSPORT_DTYPES[self.dtype])
        arrays = [self._load_entry(path, n, np_dtype) for path, n in zip(self.files, self.num_rows)]
        if not arrays:
            array = np.empty((0, self.hidden_size), dtype=np_dtype)
        elif len(arrays) == 1:
            array = arrays[0]
        else:
            array = np.concatenate(arrays)
        array.flags.writeable = False
        return TeacherOutput(array=array, dtype=self.dtype)

    def _load_entry(self, path: str, num_rows: int, np_dtype: np.dtype) -> np.ndarray:
        fix = (
            f"delete {os.path.dirname(os.path.dirname(os.path.dirname(path)))!r} (the teacher's cache directory) "
            f"or set teacher_cache.enabled=false, and rerun"
        )
        try:
            array = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        except FileNotFoundError:
            raise ValueError(
                f"teacher-output cache entry {path!r} is missing (deleted during the run?); {fix}"
            ) from None
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"teacher-output cache entry {path!r} is unreadable ({err}); {fix}") from None
        expected = (num_rows, self.hidden_size)
        if array.shape != expected or array.dtype != np_dtype:
            raise ValueError(
                f"teacher-output cache entry {path!r} holds {array.dtype}{list(array.shape)}, expected "
                f"{np_dtype}{list(expected)}; {fix}"
            )
        return array


def store_output(spec: CacheSpec, micro_batch: MicroBatch, output: TeacherOutput) -> int:
    """Write the entries of ``micro_batch``'s samples that are missing; returns the bytes written.

    Runs where the output was computed (the teacher replica). Checks the dtype, the hidden size and the row count
    against the loss mask. Safe with concurrent writers; an existing entry is left as it is.
    """
    if output.dtype != spec.transport_dtype:
        raise ValueError(
            f"teacher output dtype {output.dtype!r} != the cache's transport dtype {spec.transport_dtype!r}"
        )
    samples = _sample_rows(micro_batch)
    expected = sum(n for _, n in samples)
    array = output.array
    if array.dtype != np.dtype(_TRANSPORT_DTYPES[spec.transport_dtype]):
        raise ValueError(
            f"teacher output array has dtype {array.dtype}, expected {_TRANSPORT_DTYPES[spec.transport_dtype]}"
        )
    if array.ndim != 2 or array.shape[0] != expected or array.shape[1] != spec.hidden_size:
        raise ValueError(
            f"teacher output has shape {list(array.shape)} but the micro-batch's loss mask has {expected} prediction "
            f"positions and the cache's hidden size is {spec.hidden_size}: expected [{expected}, {spec.hidden_size}]"
        )
    bytes_written, offset = 0, 0
    for key, num_rows in samples:
        rows = array[offset : offset + num_rows]
        offset += num_rows
        if num_rows:
            bytes_written += _write_entry(spec.entry_path(key), rows)
    return bytes_written


def _write_entry(path: str, rows: np.ndarray) -> int:
    """Write ``rows`` to ``path`` unless it exists (temp file + hard link: atomic, never clobbers)."""
    if os.path.exists(path):
        return 0
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows), allow_pickle=False)
        size = os.path.getsize(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return 0  # another writer won the race; its entry stays
        except OSError:  # a filesystem without hard links: rename (atomic; may replace an identical entry)
            if os.path.exists(path):
                return 0
            os.replace(tmp, path)
        return size
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------------------
# the driver-side cache


class TeacherOutputCache:
    """The driver's handle on one teacher's cache directory: opens/validates it, looks micro-batches up, counts."""

    def __init__(self, spec: CacheSpec, manifest: dict[str, Any]):
        self.spec = spec
        self.manifest = manifest
        self._counts = dict.fromkeys(
            ("hits", "misses", "sample_hits", "sample_misses", "bytes_written", "bytes_read"), 0
        )
        self._entries_at_open = self._count_entries()

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        teacher_fingerprint: str,
        teacher_description: dict[str, Any],
        transport_dtype: str,
        hidden_size: int,
        data_fingerprint: str | None,
    ) -> TeacherOutputCache:
        """Create or validate ``<root>/<teacher_fingerprint[:16]>-<transport_dtype>/`` and its manifest."""
        if transport_dtype not in _TRANSPORT_DTYPES:
            raise ValueError(f"transport dtype must be one of {sorted(_TRANSPORT_DTYPES)}, got {transport_dtype!r}")
        root = Path(root)
        path = root / f"{teacher_fingerprint[:16]}-{transport_dtype}"
        if not (path / _MANIFEST).exists():
            _log_new_cache(root, path)
        path.mkdir(parents=True, exist_ok=True)
        expected = {
            "format_version": FORMAT_VERSION,
            "teacher_fingerprint": teacher_fingerprint,
            "transport_dtype": transport_dtype,
            "hidden_size": int(hidden_size),
        }
        with _locked(path / ".manifest.lock"):
            manifest = _read_manifest(path)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if manifest is None:
                manifest = {
                    **expected,
                    "teacher_description": teacher_description,
                    "data_fingerprints": [],
                    "created": now,
                }
            else:
                _check_manifest(path, manifest, expected)
                known = manifest.get("data_fingerprints", [])
                if data_fingerprint and data_fingerprint not in known and known:
                    logger.info(
                        f"teacher cache {path}: this data file is new to it ({len(known)} other data file(s) wrote "
                        f"into it); samples whose tokens changed miss and are recomputed"
                    )
            if data_fingerprint and data_fingerprint not in manifest["data_fingerprints"]:
                manifest["data_fingerprints"].append(data_fingerprint)
            manifest["updated"] = now
            _write_json_atomic(path / _MANIFEST, manifest)
        spec = CacheSpec(path=str(path), transport_dtype=transport_dtype, hidden_size=int(hidden_size))
        return cls(spec, manifest)

    def lookup(self, micro_batch: MicroBatch) -> CachedOutputRef | None:
        """A ref to ``micro_batch``'s output if every sample of it is cached, else None (counts hits and misses).

        A micro-batch without prediction positions (a filler) is a trivial hit with an empty output, not counted.
        """
        samples = [(key, n) for key, n in _sample_rows(micro_batch) if n]
        files = tuple(self.spec.entry_path(key) for key, _ in samples)
        num_present = sum(os.path.exists(f) for f in files)
        if samples:
            self._counts["sample_hits"] += num_present
            self._counts["sample_misses"] += len(files) - num_present
        if num_present < len(files):
            self._counts["misses"] += 1
            return None
        ref = CachedOutputRef(
            files=files,
            num_rows=tuple(n for _, n in samples),
            dtype=self.spec.transport_dtype,
            hidden_size=self.spec.hidden_size,
        )
        if samples:
            self._counts["hits"] += 1
            self._counts["bytes_read"] += ref.nbytes
        return ref

    def record_store(self, num_bytes: int) -> None:
        """Count the bytes a ``store_output`` call reported (it runs on a replica; the driver sums its results)."""
        self._counts["bytes_written"] += int(num_bytes)

    def stats(self) -> dict[str, int]:
        """Counters of this run: micro-batch ``hits``/``misses``, ``sample_hits``/``sample_misses``,
        ``entries_written`` (new entry files since ``open``, by any writer), ``bytes_written`` (as recorded by
        :meth:`record_store`) and ``bytes_read`` (bytes of the hits handed out; each consuming rank reads them)."""
        return {**self._counts, "entries_written": self._count_entries() - self._entries_at_open}

    def log_stats(self) -> dict[str, int]:
        """Log :meth:`stats` as one line and return it."""
        s = self.stats()
        lookups = s["hits"] + s["misses"]
        logger.info(
            f"teacher cache {self.spec.path}: {s['hits']}/{lookups} micro-batches hit "
            f"({s['sample_hits']} samples hit, {s['sample_misses']} missed), {s['entries_written']} entries written "
            f"({s['bytes_written'] / 2**20:.1f} MiB), {s['bytes_read'] / 2**20:.1f} MiB served from the cache"
        )
        return s

    def _count_entries(self) -> int:
        entries = os.path.join(self.spec.path, "entries")
        if not os.path.isdir(entries):
            return 0
        count = 0
        for shard in os.scandir(entries):
            if shard.is_dir():
                count += sum(1 for e in os.scandir(shard.path) if e.name.endswith(".npy") and e.name[0] != ".")
        return count


def _log_new_cache(root: Path, path: Path) -> None:
    others = sorted(str(p) for p in root.glob("*/" + _MANIFEST) if p.parent != path) if root.is_dir() else []
    if others:
        dirs = [os.path.dirname(p) for p in others]
        logger.info(
            f"teacher cache: a new cache starts at {path} for this teacher; {len(dirs)} older cache(s) for other "
            f"teachers (or transport dtypes) exist at {', '.join(dirs)} (safe to delete)"
        )
    else:
        logger.info(f"teacher cache: a new cache starts at {path}")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / _MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ValueError(
            f"teacher-output cache manifest {str(file)!r} is unreadable ({err}); delete the directory {str(path)!r} "
            f"or set teacher_cache.enabled=false"
        ) from None
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise ValueError(
                f"teacher-output cache {str(path)!r} does not match this run: its manifest has {key}="
                f"{manifest.get(key)!r}, this run expects {value!r}; delete the directory {str(path)!r} (it will be "
                f"rebuilt) or set teacher_cache.enabled=false"
            )


def _write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix="." + file.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(lock_file: Path):
    """An exclusive ``flock`` on ``lock_file`` (best effort: where flock is unsupported, no lock)."""
    import fcntl

    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
