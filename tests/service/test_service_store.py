"""The codec store: content addresses, restarts, verification, LRU cache, concurrency."""

from __future__ import annotations

import os
import threading

import grpc
import numpy as np
import pytest
from service_helpers import running_server

import embcomp
from embcomp import ArtifactError, InputError
from embcomp.artifacts import codec_id
from embcomp.client import CompressionClient, ServiceError
from embcomp.service.errors import CodecNotFoundError, LimitExceededError
from embcomp.service.store import CodecStore, loaded_bytes


@pytest.fixture(scope="module")
def codecs(sample):
    base = sample[0]
    return [embcomp.make_codec(spec).fit(base[:400]) for spec in ("int8", "fp8", "pca32,int4")]


def test_restart_keeps_ids_and_bytes(tmp_path, sample):
    base, queries = sample
    store = tmp_path / "store"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        first = client.fit("pca128,fp8", base)
        codes = client.encode(first.id, queries)
        exported = client.export_codec(first.id)
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        assert client.get(first.id) == first  # same id, same created time
        np.testing.assert_array_equal(client.encode(first.id, queries), codes)
        assert client.export_codec(first.id) == exported
        assert client.fit("pca128,fp8", base) == first


def test_put_is_content_addressed_and_idempotent(tmp_path, codecs):
    store = CodecStore(tmp_path)
    first = store.put(codecs[0])
    assert first.id == codec_id(codecs[0]) and len(first.sha256) == 64
    assert store.put(codecs[0]) == first
    assert store.put_bytes(embcomp.codec_to_bytes(codecs[0])) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first.id}.codec", f"{first.id}.json"]
    assert store.ids() == [first.id] and first.id in store and len(store) == 1


def test_opening_the_store_removes_what_a_killed_server_half_wrote(tmp_path, codecs):
    first = CodecStore(tmp_path).put(codecs[0])
    other_id = "0" * len(first.id)
    stale = [
        tmp_path / f".{first.id}.codec.abcdefgh.tmp",
        tmp_path / f".{other_id}.json.k3x_9q0a.tmp",
        tmp_path / "..write-probe.abcdefgh.tmp",  # the probe is ".write-probe"
    ]
    young = tmp_path / f".{'1' * len(first.id)}.codec.abcdefgh.tmp"  # another process, now
    others = tmp_path / ".x.json.abcdefgh.tmp"  # not a store name: not the store's to remove
    for path in [*stale, young, others]:
        path.write_bytes(b"partial")
    for path in [*stale, others]:
        os.utime(path, (0, 0))
    store = CodecStore(tmp_path)
    assert not any(path.exists() for path in stale) and young.exists() and others.exists()
    assert store.ids() == [first.id]


def test_load_verifies_the_file_against_its_id(tmp_path, codecs):
    store = CodecStore(tmp_path)
    a, b = store.put(codecs[0]), store.put(codecs[1])
    # Replace a's file with b's (valid, but not the content a's id names).
    os.replace(tmp_path / f"{b.id}.codec", tmp_path / f"{a.id}.codec")
    fresh = CodecStore(tmp_path)  # empty cache: must read the file
    with pytest.raises(ArtifactError, match="corrupted"):
        fresh.get(a.id)
    with pytest.raises(CodecNotFoundError):
        fresh.get(b.id)


def _damage(path):
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0x01
    path.write_bytes(bytes(damaged))


@pytest.mark.parametrize("sidecar", ["kept", "lost"])
def test_importing_or_fitting_again_repairs_a_damaged_stored_file(tmp_path, sample, sidecar):
    """Once, a re-import of the good artifact kept the damaged file (the sidecar said all
    was well) or, with the sidecar gone, failed as INVALID_ARGUMENT: the upload blamed
    for the store's fault."""
    train = sample[0][:300]
    store = tmp_path / "store"
    with running_server(store) as srv, CompressionClient(f"127.0.0.1:{srv.port}") as client:
        info = client.fit("int8", train)
        good = client.export_codec(info.id)
        for repair in (lambda: client.import_codec(good), lambda: client.fit("int8", train)):
            _damage(store / f"{info.id}.codec")
            if sidecar == "lost":
                (store / f"{info.id}.json").unlink()
            with pytest.raises(ServiceError) as caught:
                client.export_codec(info.id)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "corrupted" in caught.value.details()
            repaired = repair()
            assert repaired.id == info.id and repaired.sha256 == info.sha256
            if sidecar == "kept":
                assert repaired.created == info.created
            assert (store / f"{info.id}.codec").read_bytes() == good
            assert client.export_codec(info.id) == good
            assert client.get(info.id) == repaired
    assert sorted(p.name for p in store.iterdir()) == [f"{info.id}.codec", f"{info.id}.json"]


def test_a_file_replaced_by_another_codec_is_repaired_by_put(tmp_path, codecs):
    store = CodecStore(tmp_path)
    meta = store.put(codecs[0])
    other = embcomp.codec_to_bytes(codecs[1])
    (tmp_path / f"{meta.id}.codec").write_bytes(other)  # valid, but not this id's bytes
    with pytest.raises(ArtifactError, match="corrupted"):
        CodecStore(tmp_path).get(meta.id)
    # put repairs it: the file's sha256 does not start with the id, so it is damaged
    assert CodecStore(tmp_path).put(codecs[0]) == meta
    assert (tmp_path / f"{meta.id}.codec").read_bytes() == embcomp.codec_to_bytes(codecs[0])


def test_missing_sidecar_is_rebuilt(tmp_path, codecs):
    store = CodecStore(tmp_path)
    meta = store.put(codecs[2])
    (tmp_path / f"{meta.id}.json").unlink()
    rebuilt = CodecStore(tmp_path).info(meta.id)
    assert (rebuilt.id, rebuilt.spec, rebuilt.code_size) == (meta.id, "pca32,int4", 16)
    assert (tmp_path / f"{meta.id}.json").exists()


def test_lru_cache_keeps_the_most_recent(tmp_path, codecs):
    writer = CodecStore(tmp_path)
    ids = [writer.put(c).id for c in codecs]
    store = CodecStore(tmp_path, cache_size=2)
    for cid in ids:
        store.get(cid)
    store.get(ids[1])
    assert list(store._cache) == [ids[2], ids[1]]
    assert store.get(ids[0]) is not None  # evicted entries reload from disk
    assert list(store._cache) == [ids[1], ids[0]]


def test_an_artifact_over_the_size_limit_is_not_stored(tmp_path, codecs):
    blob = embcomp.codec_to_bytes(codecs[0])
    store = CodecStore(tmp_path, max_artifact_bytes=len(blob) - 1)
    for put in (lambda: store.put(codecs[0]), lambda: store.put_bytes(blob)):
        with pytest.raises(LimitExceededError, match=f"int8 codec's artifact is {len(blob)} bytes"):
            put()
    assert list(tmp_path.iterdir()) == []
    assert CodecStore(tmp_path, max_artifact_bytes=len(blob)).put(codecs[0]).artifact_size == len(
        blob
    )


def test_loaded_bytes_counts_state_and_derived_arrays_once(sample):
    codec = embcomp.codec_from_bytes(
        embcomp.codec_to_bytes(embcomp.make_codec("rot,int8").fit(sample[0][:400]))
    )
    matrix = 384 * 384 * 4
    # components_ (also the inverse: a rotation's), its padded projection (also the
    # queries') and the padded inverse: three 384 x 384 float32 matrices, then the
    # per-dimension vectors
    assert 3 * matrix < loaded_bytes(codec) < 3 * matrix + 64 * 384
    whitened = embcomp.make_codec("pca,int8", whiten=True).fit(sample[0][:400])
    # a distinct inverse: both matrices and the three projections
    assert 5 * matrix < loaded_bytes(embcomp.codec_from_bytes(embcomp.codec_to_bytes(whitened)))
    int8 = embcomp.make_codec("int8").fit(sample[0][:400])
    assert loaded_bytes(int8) < 16 * 384


def test_the_cache_is_bounded_by_bytes_too(tmp_path, sample):
    """Once, 6 imported 32 MiB rot,int8 codecs pinned ~570 MB: only the count (32) was
    bounded."""
    train = sample[0][:400]
    codecs = [embcomp.make_codec("rot,int8", seed=seed).fit(train) for seed in range(4)]
    size = loaded_bytes(embcomp.codec_from_bytes(embcomp.codec_to_bytes(codecs[0])))
    store = tmp_path / "store"
    with (
        running_server(store, cache_bytes=int(2.5 * size)) as srv,
        CompressionClient(f"127.0.0.1:{srv.port}") as client,
    ):
        ids = [client.import_codec(codec).id for codec in codecs]
        for codec_id in ids:
            client.encode(codec_id, train[:2])
            assert srv.store._cached_bytes <= 2.5 * size
        assert list(srv.store._cache) == ids[2:]  # the two most recently used
        assert srv.store._cached_bytes == sum(n for _, n in srv.store._cache.values())
        client.encode(ids[0], train[:2])  # evicted entries reload from disk
        assert list(srv.store._cache) == [ids[3], ids[0]]
    # a codec larger than the whole budget is served, just not kept
    with (
        running_server(store, cache_bytes=size - 1) as srv,
        CompressionClient(f"127.0.0.1:{srv.port}") as client,
    ):
        np.testing.assert_array_equal(client.encode(ids[1], train[:5]), codecs[1].encode(train[:5]))
        assert not srv.store._cache and srv.store._cached_bytes == 0


def test_delete_removes_files_and_cache(tmp_path, codecs):
    store = CodecStore(tmp_path)
    meta = store.put(codecs[0])
    store.get(meta.id)
    store.delete(meta.id)
    assert list(tmp_path.iterdir()) == [] and meta.id not in store._cache
    with pytest.raises(CodecNotFoundError):
        store.get(meta.id)
    with pytest.raises(CodecNotFoundError):
        store.delete(meta.id)


def test_two_processes_sharing_a_directory_see_each_other(tmp_path, codecs):
    one, two = CodecStore(tmp_path), CodecStore(tmp_path)
    meta = one.put(codecs[1])
    assert two.info(meta.id) == meta
    two.delete(meta.id)
    assert meta.id not in one


def test_a_codec_another_server_deleted_is_not_served_from_the_cache(tmp_path, sample):
    """Once, a server sharing its store kept encoding with a codec another had deleted,
    and its own DeleteCodec said NOT_FOUND yet kept the codec cached."""
    train = sample[0][:200]
    store = tmp_path / "store"
    with (
        running_server(store) as a,
        running_server(store) as b,
        CompressionClient(f"127.0.0.1:{a.port}") as client_a,
        CompressionClient(f"127.0.0.1:{b.port}") as client_b,
    ):
        info = client_a.fit("int8", train)
        client_b.encode(info.id, train[:3])  # now cached in b
        assert info.id in b.store._cache
        client_a.delete(info.id)
        for call in (
            lambda: client_b.get(info.id),
            lambda: client_b.encode(info.id, train[:3]),
            lambda: client_b.delete(info.id),
        ):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.id in caught.value.details()
        assert info.id not in b.store._cache


def test_delete_drops_the_cache_entry_even_when_the_file_is_gone(tmp_path, codecs):
    store = CodecStore(tmp_path)
    meta = store.put(codecs[0])
    assert meta.id in store._cache
    (tmp_path / f"{meta.id}.codec").unlink()  # another process deleted it
    with pytest.raises(CodecNotFoundError):
        store.delete(meta.id)
    assert meta.id not in store._cache


def test_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot use"):
        CodecStore(blocker / "store")


def test_concurrent_fits_and_deletes_leave_a_consistent_store(tmp_path, sample):
    base = sample[0]
    specs = ["int8", "fp8", "int4", "fp16"]
    expected = {spec: codec_id(embcomp.make_codec(spec).fit(base[:300])) for spec in specs}
    store = tmp_path / "store"
    failures: list[BaseException] = []
    with running_server(store, max_concurrent_fits=8) as srv:
        target = f"127.0.0.1:{srv.port}"
        barrier = threading.Barrier(8)

        def work(index: int) -> None:
            spec = specs[index % len(specs)]
            try:
                with CompressionClient(target) as client:
                    barrier.wait()
                    for round_ in range(4):
                        info = client.fit(spec, base[:300])
                        assert info.id == expected[spec]
                        if (index + round_) % 3 == 0:
                            try:
                                client.delete(info.id)
                            except embcomp.EmbcompError as exc:  # another thread deleted it first
                                assert exc.code().name == "NOT_FOUND"
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        with CompressionClient(target) as client:
            listed = {info.id for info in client.list()}
            for codec_id_ in listed:
                assert client.export_codec(codec_id_)  # every listed entry loads and verifies
    names = {p.name for p in store.iterdir()}
    assert {n for n in names if n.endswith(".codec")} == {f"{i}.codec" for i in listed}
    assert {n for n in names if n.endswith(".json")} == {f"{i}.json" for i in listed}
    assert not [n for n in names if n.endswith(".tmp")]
    assert listed <= set(expected.values())
