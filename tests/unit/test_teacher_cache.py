"""The teacher-output cache: per-sample, content-addressed entries that any later layout of the same samples hits,
bit-exact, and that a changed sample, teacher or manifest never serves."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

from kdscale.data.batch import MicroBatch, sample_spans
from kdscale.data.layout import make_filler_micro_batch, make_micro_batch, make_packed_micro_batch
from kdscale.data.tokenization import TokenizedSample
from kdscale.teacher.base import TeacherOutput
from kdscale.teacher.cache import (
    CachedOutputRef,
    CacheSpec,
    TeacherOutputCache,
    data_fingerprint,
    store_output,
    teacher_fingerprint,
)
from kdscale.transport.channel import InProcessChannel

H = 8
PAD = 0


def _sample(sample_id: int, length: int, prompt: int, seed: int) -> TokenizedSample:
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros(length, dtype=bool)
    loss_mask[prompt:] = True
    return TokenizedSample(sample_id, rng.integers(1, 100, size=length).astype(np.int32), loss_mask)


def _samples() -> list[TokenizedSample]:
    return [_sample(i, length, prompt, seed=i) for i, (length, prompt) in enumerate([(9, 3), (6, 2), (12, 5), (7, 4)])]


def _rows(sample: TokenizedSample, dtype: str = "bfloat16") -> TeacherOutput:
    """Deterministic per-sample 'hidden states', a function of its tokens only (like a causal teacher)."""
    seed = int(sample.input_ids.astype(np.int64).sum()) * 1000 + len(sample)
    hidden = torch.randn(sample.num_loss_tokens, H, generator=torch.Generator().manual_seed(seed))
    return TeacherOutput.from_tensor(hidden, dtype)


def _output(samples: list[TokenizedSample], dtype: str = "bfloat16") -> TeacherOutput:
    return TeacherOutput(np.concatenate([_rows(s, dtype).array for s in samples]), dtype)


def _packed(samples: list[TokenizedSample]) -> MicroBatch:
    return make_packed_micro_batch(samples, pad_token_id=PAD, pad_to_multiple_of=16)  # with a pad tail


def _open(root, *, fingerprint: str = "a" * 64, dtype: str = "bfloat16", hidden_size: int = H, data_fp: str = "d1"):
    return TeacherOutputCache.open(
        root,
        teacher_fingerprint=fingerprint,
        teacher_description={"engine": "hf", "model_path": "/m", "dtype": "float32"},
        transport_dtype=dtype,
        hidden_size=hidden_size,
        data_fingerprint=data_fp,
    )


@pytest.fixture
def cache_log():
    """Records the kdscale logger's lines (it does not propagate to the root logger, so caplog misses them)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("kdscale")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    samples = _samples()
    cache = _open(tmp_path, dtype=dtype)
    mb = make_micro_batch(samples, pad_token_id=PAD)
    output = _output(samples, dtype)
    assert cache.lookup(mb) is None
    written = store_output(cache.spec, mb, output)
    assert written > output.nbytes  # the data plus one .npy header per sample
    assert store_output(cache.spec, mb, output) == 0  # existing entries are never rewritten
    ref = cache.lookup(mb)
    assert isinstance(ref, CachedOutputRef) and ref.nbytes == output.nbytes
    loaded = ref.load()
    assert loaded.dtype == dtype and loaded.array.dtype == output.array.dtype
    np.testing.assert_array_equal(loaded.array, output.array)
    assert not loaded.array.flags.writeable
    cache.record_store(written)
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "sample_hits": 4,
        "sample_misses": 4,
        "entries_written": 4,
        "bytes_written": written,
        "bytes_read": output.nbytes,
    }


def test_single_sample_hit_is_a_read_only_memory_map(tmp_path):
    sample = _samples()[0]
    cache = _open(tmp_path)
    mb = make_micro_batch([sample], pad_token_id=PAD)
    store_output(cache.spec, mb, _rows(sample))
    loaded = cache.lookup(mb).load()
    assert isinstance(loaded.array.base, np.memmap) and not loaded.array.flags.writeable  # a view of the file
    tensor = loaded.as_tensor()
    assert tensor.data_ptr() == loaded.array.__array_interface__["data"][0]  # and no copy into torch either
    assert torch.equal(tensor, _rows(sample).as_tensor())


def test_another_layout_of_the_same_samples_hits(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    first = [make_micro_batch(samples[:2], pad_token_id=PAD), make_micro_batch(samples[2:], pad_token_id=PAD)]
    for mb, group in zip(first, [samples[:2], samples[2:]]):
        store_output(cache.spec, mb, _output(group))
    # another epoch: other groups, other order, other padding, and a packed micro-batch
    for group in ([samples[3], samples[0], samples[2]], [samples[1]]):
        mb = make_micro_batch(group, pad_token_id=PAD, pad_to_multiple_of=8)
        np.testing.assert_array_equal(cache.lookup(mb).load().array, _output(group).array)
    group = [samples[2], samples[1], samples[3], samples[0]]
    packed = _packed(group)
    assert [stop - start for _, start, stop in sample_spans(packed)] == [len(s) for s in group]
    np.testing.assert_array_equal(cache.lookup(packed).load().array, _output(group).array)


def test_packed_micro_batch_writes_entries_that_padded_layouts_hit(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    store_output(cache.spec, _packed(samples), _output(samples))
    mb = make_micro_batch(samples[::-1], pad_token_id=PAD)
    np.testing.assert_array_equal(cache.lookup(mb).load().array, _output(samples[::-1]).array)


def test_changed_sample_misses(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    store_output(cache.spec, make_micro_batch(samples, pad_token_id=PAD), _output(samples))
    changed = TokenizedSample(samples[1].sample_id, samples[1].input_ids.copy(), samples[1].loss_mask)
    changed.input_ids[0] += 1  # one prompt token
    assert cache.lookup(make_micro_batch([samples[0], changed], pad_token_id=PAD)) is None
    remasked = TokenizedSample(samples[1].sample_id, samples[1].input_ids, samples[1].loss_mask.copy())
    remasked.loss_mask[-1] = False  # same tokens, other targets
    assert cache.lookup(make_micro_batch([remasked], pad_token_id=PAD)) is None
    assert cache.stats()["sample_misses"] == 2 and cache.stats()["sample_hits"] == 1
    # the key is the content, not the dataset row id
    renumbered = TokenizedSample(99, samples[1].input_ids, samples[1].loss_mask)
    assert cache.lookup(make_micro_batch([renumbered], pad_token_id=PAD)) is not None


def test_filler_micro_batch_is_an_empty_hit(tmp_path):
    cache = _open(tmp_path)
    filler = make_filler_micro_batch(pad_token_id=PAD, pad_to_multiple_of=4)
    assert store_output(cache.spec, filler, TeacherOutput(np.empty((0, H), np.int16), "bfloat16")) == 0
    ref = cache.lookup(filler)
    assert ref is not None and ref.files == ()
    assert ref.load().array.shape == (0, H)
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0
    assert not os.path.exists(os.path.join(cache.spec.path, "entries"))


def test_row_count_mismatch_raises(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    mb = make_micro_batch(samples, pad_token_id=PAD)
    output = _output(samples)
    with pytest.raises(ValueError, match=r"prediction positions"):
        store_output(cache.spec, mb, TeacherOutput(output.array[:-1], "bfloat16"))
    with pytest.raises(ValueError, match=r"transport dtype"):
        store_output(cache.spec, mb, _output(samples, "float32"))
    assert cache.lookup(mb) is None  # nothing was written


def test_packed_micro_batch_with_a_target_at_a_sample_start_is_rejected(tmp_path):
    samples = _samples()[:2]
    mb = _packed(samples)
    mb.loss_mask[0, len(samples[0])] = True  # the second sample's first token
    with pytest.raises(ValueError, match="False at each sample's first token"):
        _open(tmp_path).lookup(mb)


def test_changed_teacher_starts_a_new_directory_and_says_so(tmp_path, cache_log):
    old = _open(tmp_path, fingerprint="a" * 64)
    assert any("a new cache starts" in line for line in cache_log)
    cache_log.clear()
    new = _open(tmp_path, fingerprint="b" * 64)
    assert new.spec.path != old.spec.path
    assert os.path.basename(new.spec.path) == "b" * 16 + "-bfloat16"
    (line,) = [line for line in cache_log if "a new cache starts" in line]
    assert "1 older cache(s)" in line and old.spec.path in line and "safe to delete" in line
    cache_log.clear()
    _open(tmp_path, fingerprint="b" * 64)  # reopening an existing cache: no such line
    assert not any("a new cache starts" in line for line in cache_log)
    assert _open(tmp_path, dtype="float32").spec.path != old.spec.path


def test_manifest_records_teacher_and_data(tmp_path, cache_log):
    cache = _open(tmp_path, data_fp="d1")
    _open(tmp_path, data_fp="d2")
    assert any("new to it" in line for line in cache_log)
    manifest = json.loads(open(os.path.join(cache.spec.path, "manifest.json")).read())
    assert manifest["teacher_fingerprint"] == "a" * 64 and manifest["hidden_size"] == H
    assert manifest["transport_dtype"] == "bfloat16" and manifest["format_version"] == 1
    assert manifest["teacher_description"]["engine"] == "hf"
    assert manifest["data_fingerprints"] == ["d1", "d2"]
    assert "created" in manifest and "updated" in manifest


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_size", H + 1), ("transport_dtype", "float32"), ("format_version", 0), ("teacher_fingerprint", "a" * 63)],
)
def test_manifest_mismatch_raises_with_the_path(tmp_path, key, value):
    cache = _open(tmp_path)
    manifest_file = os.path.join(cache.spec.path, "manifest.json")
    manifest = json.loads(open(manifest_file).read())
    manifest[key] = value
    open(manifest_file, "w").write(json.dumps(manifest))
    with pytest.raises(ValueError, match=key) as err:
        _open(tmp_path)
    assert cache.spec.path in str(err.value) and "teacher_cache.enabled=false" in str(err.value)


def test_hidden_size_mismatch_against_an_existing_cache_raises(tmp_path):
    _open(tmp_path)
    with pytest.raises(ValueError, match=r"hidden_size=8.*expects 16"):
        _open(tmp_path, hidden_size=16)


def test_missing_or_corrupt_entry_raises_a_clear_error(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    mb = make_micro_batch(samples, pad_token_id=PAD)
    store_output(cache.spec, mb, _output(samples))
    ref = cache.lookup(mb)
    open(ref.files[1], "wb").write(b"garbage")
    with pytest.raises(ValueError, match="unreadable") as err:
        ref.load()
    assert ref.files[1] in str(err.value) and "teacher_cache.enabled=false" in str(err.value)
    np.save(ref.files[1], np.zeros((1, H), np.int16))  # a valid .npy of the wrong shape
    with pytest.raises(ValueError, match="expected int16"):
        ref.load()
    os.unlink(ref.files[2])
    with pytest.raises(ValueError, match="is missing") as err:
        dataclasses.replace(ref, files=ref.files[2:], num_rows=ref.num_rows[2:]).load()
    assert ref.files[2] in str(err.value)


def _write_all(path: str, seed: int) -> int:
    samples = _samples()
    order = np.random.default_rng(seed).permutation(len(samples))
    spec = CacheSpec(path=path, transport_dtype="bfloat16", hidden_size=H)
    written = 0
    for i in order:
        for _ in range(3):
            written += store_output(spec, make_micro_batch([samples[i]], pad_token_id=PAD), _rows(samples[i]))
        group = [samples[i], samples[(i + 1) % len(samples)]]
        written += store_output(spec, make_micro_batch(group, pad_token_id=PAD), _output(group))
    return written


def test_concurrent_writers_leave_valid_entries(tmp_path):
    cache = _open(tmp_path)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        procs = pool.starmap_async(_write_all, [(cache.spec.path, 1), (cache.spec.path, 2)])
        threads = [threading.Thread(target=_write_all, args=(cache.spec.path, seed)) for seed in (3, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        procs.get(timeout=120)
    samples = _samples()
    assert cache.stats()["entries_written"] == len(samples)
    leftovers = [name for _, _, names in os.walk(cache.spec.path) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    mb = make_micro_batch(samples, pad_token_id=PAD)
    np.testing.assert_array_equal(cache.lookup(mb).load().array, _output(samples).array)


def test_teacher_fingerprint_tracks_config_weights_and_settings(tmp_path):
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    weights = len(header).to_bytes(8, "little") + header + bytes(range(8)) + bytes(9 * 1024 * 1024)
    (model / "model.safetensors").write_bytes(weights)
    (model / "tokenizer.json").write_text("{}")

    def fp(**settings):
        return teacher_fingerprint(model, engine="hf", settings=settings or {"dtype": "float32"})

    base = fp()
    assert len(base) == 64 and fp() == base
    assert fp(dtype="bfloat16") != base
    assert teacher_fingerprint(model, engine="sglang", settings={"dtype": "float32"}) != base
    (model / "tokenizer.json").write_text('{"x": 1}')  # not numerics: same teacher
    assert fp() == base
    (model / "config.json").write_text('{"hidden_size": 8, "rms_norm_eps": 1e-5}')
    changed_config = fp()
    assert changed_config != base
    data = bytearray(weights)
    data[len(header) + 8] ^= 1  # the first weight byte
    (model / "model.safetensors").write_bytes(bytes(data))
    changed_start = fp()
    assert changed_start != changed_config
    data[-1] ^= 1  # the last byte
    (model / "model.safetensors").write_bytes(bytes(data))
    assert fp() != changed_start
    (model / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weight files"):
        fp()


def test_data_fingerprint(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_text('{"prompt": "a", "response": "b"}\n')
    first = data_fingerprint(file)
    assert data_fingerprint(file) == first
    file.write_text('{"prompt": "a", "response": "c"}\n')
    assert data_fingerprint(file) != first


def test_in_process_channel_resolves_a_mix_of_refs_in_order(tmp_path):
    samples = _samples()
    cache = _open(tmp_path)
    cached_mb = make_micro_batch(samples[:2], pad_token_id=PAD)
    store_output(cache.spec, cached_mb, _output(samples[:2]))
    direct = _output(samples[2:])
    channel = InProcessChannel()
    cached_ref = cache.lookup(cached_mb)
    tensors = channel.get([cached_ref, channel.put(direct), cached_ref])
    assert [t.dtype for t in tensors] == [torch.bfloat16] * 3
    assert torch.equal(tensors[0], _output(samples[:2]).as_tensor())
    assert torch.equal(tensors[1], direct.as_tensor()) and torch.equal(tensors[2], tensors[0])
    assert channel.last_get_bytes == 2 * cached_ref.nbytes + direct.nbytes


def test_ray_channel_resolves_a_mix_of_refs_in_order(tmp_path, ray_session):
    from kdscale.transport.channel import RayObjectStoreChannel

    samples = _samples()
    cache = _open(tmp_path)
    cached_mb = make_micro_batch(samples[:2], pad_token_id=PAD)
    store_output(cache.spec, cached_mb, _output(samples[:2]))
    channel = RayObjectStoreChannel(timeout_s=60)
    direct = [_output(samples[2:3]), _output(samples[3:])]
    object_refs = [channel.put(o) for o in direct]
    cached_ref = cache.lookup(cached_mb)
    tensors = channel.get([object_refs[0], cached_ref, object_refs[1]])
    assert torch.equal(tensors[0], direct[0].as_tensor()) and torch.equal(tensors[2], direct[1].as_tensor())
    assert torch.equal(tensors[1], _output(samples[:2]).as_tensor())
    assert channel.last_get_bytes == cached_ref.nbytes + direct[0].nbytes + direct[1].nbytes
    assert channel.last_get_seconds > 0
