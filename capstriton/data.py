"""MNIST from the official IDX gzip files, without torchvision, and the paper's augmentation.

    from capstriton import data
    images, labels = data.load_mnist("data/mnist", "test")   # uint8 [10000, 28, 28], int64 [10000]
    x = data.random_shift(data.to_float(images[:128]))       # float [128, 1, 28, 28] in [0, 1]

Files are checked against their published md5 on every load. Missing files are downloaded from
the public mirrors in :data:`MIRRORS` (a file is moved into place only once its md5 matches);
when that fails, the error names the missing files, the directory and what each mirror answered,
and the directories the download created are removed again if they stayed empty.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ._checks import check_size

__all__ = [
    "FILES",
    "MD5",
    "MIRRORS",
    "MNISTDataError",
    "md5sum",
    "check_file",
    "read_idx",
    "write_idx",
    "download_mnist",
    "load_mnist",
    "to_float",
    "draw_shifts",
    "random_shift",
    "shard_batches",
]

#: The four files of each split: (images, labels).
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: md5 of the official files, as published by the dataset's mirrors.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

#: Public mirrors of the original files, tried in order (yann.lecun.com now often refuses).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# IDX type code 0x08 is unsigned byte, the only type the MNIST files use.
_IDX_UBYTE = 0x08


class MNISTDataError(RuntimeError):
    """A data file is missing, corrupted or could not be downloaded."""


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | os.PathLike, expected_md5: str | None = None) -> None:
    """Raise :class:`MNISTDataError` if ``path`` does not have ``expected_md5`` (default: the
    published md5 of a file of that name)."""
    path = Path(path)
    expected = expected_md5 if expected_md5 is not None else MD5.get(path.name)
    if expected is None:
        return
    actual = md5sum(path)
    if actual != expected:
        raise MNISTDataError(
            f"md5 mismatch for {path}: expected {expected}, got {actual}. The file is corrupted or "
            "not the official one: delete it to download it again."
        )


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read a gzip-compressed IDX file of unsigned bytes into a uint8 tensor of its shape."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise MNISTDataError(
            f"{path} is not a complete gzip file: it is truncated or corrupted ({type(e).__name__}: {e})"
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MNISTDataError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise MNISTDataError(f"{path}: IDX type code {raw[2]:#04x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTDataError(f"{path}: header announces {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for n in shape:
        count *= n
    if len(raw) - header != count:
        raise MNISTDataError(f"{path}: header announces shape {shape} ({count} bytes) but holds {len(raw) - header}")
    if count == 0:
        return torch.empty(shape, dtype=torch.uint8)  # torch.frombuffer refuses an empty buffer
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def write_idx(path: str | os.PathLike, array: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzip-compressed IDX file (the inverse of :func:`read_idx`)."""
    if array.dtype != torch.uint8:
        raise TypeError(f"array must be a uint8 tensor, got {array.dtype}")
    header = bytes([0, 0, _IDX_UBYTE, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.contiguous().cpu().numpy().tobytes())


def _fetch(url: str, destination: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def _download_one(url: str, destination: Path, timeout: float) -> str | None:
    """Fetch ``url`` into ``destination`` if its md5 is right; the reason it failed otherwise."""
    # A temporary file in the same directory: the final name appears only once the download is
    # complete and verified, so an interrupted or corrupted download never passes for the file.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    except OSError as e:
        return f"cannot write into {destination.parent}: {e}"
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _fetch(url, tmp_path, timeout)
        check_file(tmp_path, MD5.get(destination.name))
        os.replace(tmp_path, destination)
        return None
    except (urllib.error.URLError, OSError, ValueError, MNISTDataError) as e:
        return str(e)
    finally:
        tmp_path.unlink(missing_ok=True)


def download_mnist(
    root: str | os.PathLike,
    names: Sequence[str],
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
) -> None:
    """Download ``names`` into ``root`` from the first mirror that serves each of them with the
    right md5. Raise :class:`MNISTDataError` naming every file that could not be obtained."""
    root = Path(root)
    created = [d for d in (root, *root.parents) if not d.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MNISTDataError(f"cannot create the data directory {root} to download {list(names)}: {e}") from e
    failures: dict[str, list[str]] = {}
    for name in names:
        attempts: list[str] = []
        for mirror in mirrors:
            error = _download_one(mirror + name, root / name, timeout)
            if error is None:
                break
            attempts.append(f"{mirror + name}: {error}")
        else:
            failures[name] = attempts
    if failures:
        _remove_empty(created)
        detail = "\n".join(f"  {n}:\n" + "\n".join(f"    {a}" for a in a_list) for n, a_list in failures.items())
        raise MNISTDataError(
            f"MNIST files missing from {root} and could not be downloaded: {sorted(failures)}.\n"
            f"{detail}\nPut the official files (md5 in capstriton.data.MD5) into {root}."
        )


def _remove_empty(directories: Sequence[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty: a failed download leaves no
    trace of the directories it created, and never touches one that holds anything."""
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            return


def load_mnist(
    root: str | os.PathLike,
    split: str = "train",
    download: bool = True,
    mirrors: Sequence[str] = MIRRORS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of ``split`` ("train": 60,000;
    "test": 10,000) from the IDX gzip files in ``root``.

    Missing files are downloaded when ``download`` is true; otherwise, or when that fails,
    :class:`MNISTDataError` names them and ``root``. A file whose md5 differs from the published
    one raises :class:`MNISTDataError` naming the file and both digests.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    root = Path(root)
    names = FILES[split]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        if not download:
            raise MNISTDataError(f"MNIST {split} files missing from {root}: {missing} (downloading is switched off)")
        download_mnist(root, missing, mirrors)
    for n in names:
        check_file(root / n)
    images, labels = (read_idx(root / n) for n in names)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise MNISTDataError(
            f"{root}: {names[0]} has shape {tuple(images.shape)} and {names[1]} "
            f"{tuple(labels.shape)}; expected [N, 28, 28] images and [N] labels"
        )
    return images, labels.long()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Pixel values 0 to 255, ``[B, H, W]`` -> float32 ``[B, 1, H, W]`` in ``[0, 1]`` (the decoder's
    range); ``[B, C, H, W]`` keeps its channels. Any dtype is read as such values (uint8 as MNIST
    stores them, or a float tensor of them): float images already in [0, 1] must not come here."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() != 4:
        raise ValueError(f"images must have shape [B, H, W] or [B, C, H, W], got {tuple(images.shape)}")
    # A copy even for float input: dividing in place must never touch the caller's tensor.
    return images.to(torch.float32, copy=True).div_(255.0)


def draw_shifts(n: int, max_shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """``int64 [n, 2]`` offsets (dy, dx), each uniform in ``[-max_shift, max_shift]``, drawn on the
    CPU: what :func:`random_shift` applies."""
    max_shift = _check_max_shift(max_shift)
    return torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)


def _check_max_shift(max_shift) -> int:
    """``max_shift`` as an int >= 0 (Python's or NumPy's integers; not a bool)."""
    return check_size("max_shift", max_shift, minimum=0)


def random_shift(
    images: torch.Tensor,
    max_shift: int = 2,
    generator: torch.Generator | None = None,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shift each image by its own random offset of up to ``max_shift`` pixels in each direction,
    filling with zeros (the paper's augmentation). Batched: one gather, no Python loop.

    Args:
        images: ``[B, C, H, W]``.
        generator: draws the offsets (on the CPU) when ``shifts`` is not given.
        shifts: ``int64 [B, 2]`` (dy, dx) in ``[-max_shift, max_shift]``, to share draws made
            elsewhere (every rank of a distributed run draws the global batch's offsets).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    b, c, h, w = images.shape
    max_shift = _check_max_shift(max_shift)
    if shifts is None:
        shifts = draw_shifts(b, max_shift, generator)
    if not isinstance(shifts, torch.Tensor) or shifts.is_floating_point() or shifts.is_complex() or (
        shifts.dtype == torch.bool
    ):
        what = f"{shifts.dtype} tensor" if isinstance(shifts, torch.Tensor) else type(shifts).__name__
        raise TypeError(f"shifts must be an integer tensor, got a {what}")
    if shifts.shape != (b, 2):
        raise ValueError(f"shifts must have shape [B, 2] = [{b}, 2], got {tuple(shifts.shape)}")
    if b and shifts.abs().max() > max_shift:
        raise ValueError(f"shifts must lie in [-{max_shift}, {max_shift}] (max_shift), got {shifts.abs().max()}")
    if max_shift == 0 or b == 0:
        return images
    p = max_shift
    shifts = shifts.to(images.device)
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    # Output pixel (y, x) reads padded (y + p - dy, x + p - dx): content moves by (+dy, +dx).
    rows = torch.arange(h, device=images.device) + p - shifts[:, :1]  # [B, H]
    cols = torch.arange(w, device=images.device) + p - shifts[:, 1:]  # [B, W]
    index_b = torch.arange(b, device=images.device)[:, None, None, None]
    index_c = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]


def shard_batches(
    num_examples: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_small_last: bool = True,
) -> Iterator[tuple[torch.Tensor, slice]]:
    """Each global batch's example indices, and the slice of it that belongs to ``rank``.

    Every rank draws the same permutation from an identically seeded ``generator`` and cuts the
    same global batches of ``batch_size``; rank ``r`` owns the ``r``-th of ``world_size`` nearly
    equal, contiguous slices. With ``drop_small_last`` (for training: a rank without examples
    has no gradient to contribute), a last global batch smaller than ``world_size`` is dropped;
    without it (evaluation), some ranks' slices of that batch are empty.
    """
    # Checked here, not in the generator below, so that bad arguments fail at the call.
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
    return _shard_batches(num_examples, batch_size, rank, world_size, shuffle, generator, drop_small_last)


def _shard_batches(
    num_examples: int,
    batch_size: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_small_last: bool,
) -> Iterator[tuple[torch.Tensor, slice]]:
    order = torch.randperm(num_examples, generator=generator) if shuffle else torch.arange(num_examples)
    for start in range(0, num_examples, batch_size):
        batch = order[start : start + batch_size]
        n = batch.numel()
        if n < world_size and drop_small_last:
            break
        base, extra = divmod(n, world_size)
        lo = rank * base + min(rank, extra)
        yield batch, slice(lo, lo + base + (rank < extra))
