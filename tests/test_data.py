"""capstriton.data: IDX reading, md5 checks, downloading (from local fake mirrors only), shifts,
sharding. Download tests never touch the network: the mirrors are file:// URLs and a local
http.server on 127.0.0.1 serving generated files whose md5 replaces the published one."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import re
import socket
import struct
import threading

import numpy as np
import pytest
import torch
from _helpers import MNIST_DIR, requires_mnist_test_files

from capstriton import data


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """A directory holding small fake test-split files, their md5s made the official ones."""
    src = tmp_path / "mirror"
    src.mkdir()
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), dtype=torch.uint8)
    for name, array in zip(data.FILES["test"], (images, labels), strict=True):
        data.write_idx(src / name, array)
        monkeypatch.setitem(data.MD5, name, hashlib.md5((src / name).read_bytes()).hexdigest())
    return src, images, labels


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires_mnist_test_files
def test_real_test_split_loads_with_official_md5():
    images, labels = data.load_mnist(MNIST_DIR, "test", download=False)
    assert images.dtype == torch.uint8 and images.shape == (10_000, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (10_000,)
    counts = torch.bincount(labels, minlength=10)
    assert counts.numel() == 10 and counts.min() > 0, counts
    # Real digits: mostly black background, some saturated strokes.
    assert images.max() == 255 and (images == 0).float().mean() > 0.5


def test_read_idx_round_trip(tmp_path):
    array = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    data.write_idx(tmp_path / "a.gz", array)
    assert torch.equal(data.read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize("shape", [(0, 28, 28), (0,), (3, 0, 2)], ids=str)
def test_read_idx_round_trips_empty_arrays(tmp_path, shape):
    array = torch.empty(shape, dtype=torch.uint8)
    data.write_idx(tmp_path / "empty.gz", array)
    back = data.read_idx(tmp_path / "empty.gz")
    assert back.dtype == torch.uint8 and back.shape == shape


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "bad magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"ab", "type code"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"ab", "header announces"),
        # three dimensions announced, the file ends inside the first one's size
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2)[:3], "header announces 3 dimensions"),
    ],
    ids=["magic", "float-type", "truncated", "short-header"],
)
def test_read_idx_rejects_malformed_files(tmp_path, payload, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(data.MNISTDataError, match=message) as e:
        data.read_idx(path)
    assert "bad.gz" in str(e.value)


@pytest.mark.parametrize("damage", ["not-gzip", "truncated", "empty", "flipped"])
def test_read_idx_names_a_damaged_gzip_file(tmp_path, damage):
    array = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    data.write_idx(tmp_path / "good.gz", array)
    compressed = (tmp_path / "good.gz").read_bytes()
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF  # inside the deflate stream: bad data or a CRC mismatch
    payload = {
        "not-gzip": b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"ab",  # an uncompressed IDX
        "truncated": compressed[: len(compressed) // 2],
        "empty": b"",
        "flipped": bytes(flipped),
    }[damage]
    path = tmp_path / "damaged.gz"
    path.write_bytes(payload)
    if damage == "empty":
        # gzip reads an empty file as an empty stream: the IDX check catches it
        match = "bad magic number"
    else:
        match = "not a complete gzip file"
    with pytest.raises(data.MNISTDataError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_corrupted_file_names_md5_mismatch(tmp_path, fake_mirror):
    src, _, _ = fake_mirror
    for name in data.FILES["test"]:
        (tmp_path / name).write_bytes((src / name).read_bytes())
    corrupted = tmp_path / data.FILES["test"][0]
    raw = bytearray(corrupted.read_bytes())
    raw[-1] ^= 0xFF
    corrupted.write_bytes(bytes(raw))
    with pytest.raises(data.MNISTDataError, match="md5 mismatch") as e:
        data.load_mnist(tmp_path, "test", download=False)
    assert str(corrupted) in str(e.value)
    assert data.MD5[corrupted.name] in str(e.value)


def test_missing_files_without_download_name_files_and_directory(tmp_path):
    with pytest.raises(data.MNISTDataError) as e:
        data.load_mnist(tmp_path, "train", download=False)
    message = str(e.value)
    assert str(tmp_path) in message
    assert all(name in message for name in data.FILES["train"])


def test_failed_download_names_files_directory_and_mirrors(tmp_path):
    root = tmp_path / "mnist"
    mirrors = [f"file://{tmp_path}/nowhere/", f"http://127.0.0.1:{closed_port()}/mnist/"]
    with pytest.raises(data.MNISTDataError) as e:
        data.load_mnist(root, "test", mirrors=mirrors)
    message = str(e.value)
    assert str(root) in message and "could not be downloaded" in message
    assert all(name in message for name in data.FILES["test"])
    assert all(m in message for m in mirrors)
    assert not root.exists()  # no partial files, and not the directory the download created


def test_failed_download_removes_only_the_directories_it_created(tmp_path):
    dead = [f"http://127.0.0.1:{closed_port()}/"]
    nested = tmp_path / "a" / "b" / "c"
    with pytest.raises(data.MNISTDataError):
        data.load_mnist(nested, "test", mirrors=dead)
    assert list(tmp_path.iterdir()) == []  # a/b/c all created by the download, all removed
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(data.MNISTDataError):
        data.load_mnist(existing / "mnist", "test", mirrors=dead)
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_partly_failed_download_keeps_what_it_downloaded(tmp_path, fake_mirror):
    src, _, _ = fake_mirror
    images_only = tmp_path / "images-only"
    images_only.mkdir()
    name = data.FILES["test"][0]
    (images_only / name).write_bytes((src / name).read_bytes())
    root = tmp_path / "root"
    with pytest.raises(data.MNISTDataError, match=data.FILES["test"][1]):
        data.load_mnist(root, "test", mirrors=[f"file://{images_only}/"])
    assert [p.name for p in root.iterdir()] == [name]


def test_download_from_file_mirror_after_a_dead_one(tmp_path, fake_mirror):
    src, images, labels = fake_mirror
    root = tmp_path / "downloaded"
    mirrors = [f"http://127.0.0.1:{closed_port()}/", f"file://{src}/"]
    got_images, got_labels = data.load_mnist(root, "test", mirrors=mirrors)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels.long())
    assert sorted(p.name for p in root.iterdir()) == sorted(data.FILES["test"])


def test_download_over_http(tmp_path, fake_mirror):
    src, images, _ = fake_mirror
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(src))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        got_images, _ = data.load_mnist(tmp_path / "http", "test", mirrors=[url])
    finally:
        server.shutdown()
        server.server_close()
    assert torch.equal(got_images, images)


def test_download_rejects_a_corrupted_mirror_copy(tmp_path, fake_mirror):
    src, _, _ = fake_mirror
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    for name in data.FILES["test"]:
        (bad / name).write_bytes((src / name).read_bytes() + b"junk")
    root = tmp_path / "root"
    with pytest.raises(data.MNISTDataError, match="md5 mismatch"):
        data.load_mnist(root, "test", mirrors=[f"file://{bad}/"])
    assert not root.exists()


def test_to_float_adds_a_channel_axis_or_keeps_channels():
    gray = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    out = data.to_float(gray)
    assert out.dtype == torch.float32 and out.shape == (5, 1, 28, 28)
    torch.testing.assert_close(out[:, 0] * 255, gray.float())
    color = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    assert data.to_float(color).shape == (5, 3, 7, 9)
    already_float = torch.full((2, 1, 4, 4), 255.0)
    assert torch.equal(data.to_float(already_float), torch.ones(2, 1, 4, 4))
    assert torch.equal(already_float, torch.full((2, 1, 4, 4), 255.0))  # the input is left alone


@pytest.mark.parametrize("shape", [(28, 28), (2, 1, 1, 28, 28)], ids=str)
def test_to_float_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W\] or \[B, C, H, W\]"):
        data.to_float(torch.zeros(shape, dtype=torch.uint8))


def shift_one(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """One image [C, H, W] moved by (dy, dx) with zero fill, by slicing."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (37, 1, 28, 28), (5, 3, 7, 9)], ids=str)
def test_random_shift_matches_per_image_slicing(shape):
    images = torch.rand(shape)
    gen = torch.Generator().manual_seed(1)
    shifts = torch.randint(-2, 3, (shape[0], 2), generator=gen)
    out = data.random_shift(images, 2, shifts=shifts)
    expected = torch.stack([shift_one(images[i], *shifts[i].tolist()) for i in range(shape[0])])
    assert torch.equal(out, expected)


def test_random_shift_draws_every_offset_and_keeps_digits():
    # Digits in a 2-pixel zero border (MNIST's is 4): shifted, no ink is lost.
    images = torch.zeros(2000, 1, 28, 28)
    images[:, :, 2:-2, 2:-2] = torch.rand(2000, 1, 24, 24)
    out = data.random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.sum((1, 2, 3)), images.sum((1, 2, 3)))
    # Recover each image's offset from where its content went: all 25 occur.
    moved = {
        (dy, dx)
        for i in range(200)
        for dy in range(-2, 3)
        for dx in range(-2, 3)
        if torch.equal(out[i], shift_one(images[i], dy, dx))
    }
    assert len(moved) == 25


def test_random_shift_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        data.random_shift(torch.rand(28, 28))
    with pytest.raises(ValueError, match="shifts"):
        data.random_shift(torch.rand(3, 1, 28, 28), shifts=torch.zeros(2, 2, dtype=torch.long))
    # an offset past max_shift would read outside the padding (wrong pixels or an IndexError)
    for dy in (3, -3):
        with pytest.raises(ValueError, match=r"\[-2, 2\] \(max_shift\)"):
            data.random_shift(torch.rand(2, 1, 28, 28), 2, shifts=torch.tensor([[0, 0], [dy, 1]]))


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: data.draw_shifts(3, -1), ValueError, "max_shift must be >= 0, got -1"),
        (lambda: data.draw_shifts(3, 1.5), TypeError, "max_shift must be an int, got float"),
        (lambda: data.random_shift(torch.rand(2, 1, 8, 8), -1), ValueError, "max_shift must be >= 0, got -1"),
        (lambda: data.random_shift(torch.rand(2, 1, 8, 8), True), TypeError, "max_shift must be an int, got bool"),
        (lambda: data.draw_shifts(3, "2"), TypeError, "max_shift must be an int, got str"),
        (
            lambda: data.random_shift(torch.rand(2, 1, 8, 8), 2, shifts=torch.ones(2, 2)),
            TypeError,
            "shifts must be an integer tensor, got a torch.float32 tensor",
        ),
        (
            lambda: data.random_shift(torch.rand(2, 1, 8, 8), 2, shifts=[[0, 1], [1, 0]]),
            TypeError,
            "shifts must be an integer tensor, got a list",
        ),
    ],
)
def test_shift_arguments_are_checked_by_name(call, error, pattern):
    """Break-testing: a negative or fractional max_shift failed inside torch.randint, and float
    shifts as an IndexError from the gather; both now name the argument."""
    with pytest.raises(error, match=re.escape(pattern)):
        call()
    # NumPy's integers are integers
    assert data.draw_shifts(5, np.int64(1)).abs().max() <= 1


@pytest.mark.parametrize("num_examples, batch_size, world_size", [(10, 4, 2), (23, 8, 3), (9, 9, 4)])
def test_shard_batches_split_each_global_batch(num_examples, batch_size, world_size):
    def shards(rank):
        gen = torch.Generator().manual_seed(3)
        return list(data.shard_batches(num_examples, batch_size, rank, world_size, True, gen))

    per_rank = [shards(r) for r in range(world_size)]
    assert len({len(s) for s in per_rank}) == 1  # every rank takes the same number of steps
    seen = []
    for step in zip(*per_rank, strict=True):
        batch = step[0][0]
        assert all(torch.equal(b, batch) for b, _ in step)  # the same global batch everywhere
        parts = [batch[mine] for _, mine in step]
        assert torch.equal(torch.cat(parts), batch)  # disjoint, contiguous, complete
        sizes = [p.numel() for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        seen.append(batch)
    seen = torch.cat(seen)
    assert seen.unique().numel() == seen.numel()
    # Only a last batch smaller than world_size is dropped.
    assert num_examples - seen.numel() < world_size


def test_shard_batches_for_evaluation_keep_every_example():
    # 9 examples, batches of 4, 2 ranks: the last global batch (1 example) is split 1 / 0.
    parts = [
        torch.cat([b[mine] for b, mine in data.shard_batches(9, 4, r, 2, drop_small_last=False)]) for r in range(2)
    ]
    assert sorted(torch.cat(parts).tolist()) == list(range(9))
    assert [p.numel() for p in parts] == [5, 4]


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"world_size": 0, "rank": 0}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1, "world_size": 2}, "rank"),
        ({"num_examples": -1}, "num_examples"),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_shard_batches_rejects_bad_arguments_at_the_call(kwargs, named):
    args = {"num_examples": 10, "batch_size": 4, "rank": 0, "world_size": 1, **kwargs}
    with pytest.raises(ValueError, match=f"^{named} must"):
        data.shard_batches(**args)  # not iterated: the call itself must fail
