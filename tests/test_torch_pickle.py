"""The weights-only `.pt` reader against hostile files: views outside their storage, negative strides,
storages of the wrong size, zip bombs, stride-0 expansion bombs. The files are written byte by byte here
(pickle opcodes and zip records, the layout torch.save writes), so no torch is needed to make them; one
test checks torch itself reads the well-formed ones the same way."""
import logging
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

from sdonnx.adapters.torch_pickle import UnsafePickleError, load_torch_file

# ------------------------------------------------------------------ a torch.save-layout writer


def _str(s):
    raw = s.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


def _int(v):
    raw = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1: any size, any sign


def _tuple(items):
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _tensor(storage_key, numel, offset, size, stride, kind="FloatStorage"):
    """torch._utils._rebuild_tensor_v2(persistent storage, offset, size, stride, requires_grad, hooks)."""
    storage = _tuple([_str("storage"), b"ctorch\n" + kind.encode() + b"\n", _str(storage_key), _str("cpu"),
                      _int(numel)]) + b"Q"  # BINPERSID
    args = _tuple([storage, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)), b"\x89", b"}"])
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def _pickle(entries):
    """{name: tensor opcodes} -> a protocol-2 pickle of a dict."""
    items = b"".join(_str(k) + v for k, v in entries.items())
    return b"\x80\x02}(" + items + b"u."


def write_pt(path, entries, storages, compress=zipfile.ZIP_STORED, pickle_bytes=None):
    """A torch zip archive: archive/data.pkl, archive/data/<key> records, byteorder and version."""
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes if pickle_bytes is not None else _pickle(entries))
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


STORAGE = np.arange(12, dtype=np.float32)


def _good(path):
    return write_pt(path, {"w": _tensor("0", 12, 2, (2, 3), (4, 1)), "t": _tensor("0", 12, 1, (3, 2), (1, 4)),
                           "empty": _tensor("0", 12, 12, (0, 5), (5, 1))}, {"0": STORAGE.tobytes()})


def test_well_formed_views_are_read(tmp_path):
    data = load_torch_file(_good(tmp_path / "good.pt"))
    np.testing.assert_array_equal(data["w"], [[2, 3, 4], [6, 7, 8]])
    np.testing.assert_array_equal(data["t"], [[1, 5], [2, 6], [3, 7]])
    assert data["empty"].shape == (0, 5)


def test_torch_reads_the_hand_written_file_alike(tmp_path):
    """The hand-written layout is what torch.save writes: torch's own weights-only loader agrees."""
    torch = pytest.importorskip("torch")
    path = _good(tmp_path / "good.pt")
    ours, theirs = load_torch_file(path), torch.load(path, weights_only=True)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key].numpy())


# ------------------------------------------------------------------ hostile files

HOSTILE = {
    # a view reaching past its storage: before the fix a heap read (small) or a segfault (large)
    "overrun": ({"w": _tensor("0", 4, 0, (8,), (1,))}, {"0": np.ones(4, np.float32).tobytes()},
                "reaches element 7 of a storage of 4"),
    "offset past the end": ({"w": _tensor("0", 4, 4, (1,), (1,))}, {"0": bytes(16)}, "reaches element 4"),
    "negative stride": ({"w": _tensor("0", 4, 3, (4,), (-1,))}, {"0": bytes(16)}, "non-negative"),
    "negative offset": ({"w": _tensor("0", 4, -2, (2,), (1,))}, {"0": bytes(16)}, "non-negative"),
    "negative size": ({"w": _tensor("0", 4, 0, (-3,), (1,))}, {"0": bytes(16)}, "non-negative"),
    "size and stride disagree": ({"w": _tensor("0", 4, 0, (2, 2), (1,))}, {"0": bytes(16)}, "as long"),
    "storage shorter than declared": ({"w": _tensor("0", 8, 0, (8,), (1,))}, {"0": bytes(16)},
                                      "holds 16 bytes; its tensors declare 32"),
    "storage longer than declared": ({"w": _tensor("0", 2, 0, (2,), (1,))}, {"0": bytes(16)},
                                     "holds 16 bytes; its tensors declare 8"),
    "storage missing": ({"w": _tensor("7", 2, 0, (2,), (1,))}, {"0": bytes(8)}, "storage 7 is missing"),
    "negative numel": ({"w": _tensor("0", -4, 0, (2,), (1,))}, {"0": bytes(16)}, "persistent id"),
    # one float expanded by stride 0 into 256 MiB
    "stride-0 bomb": ({"w": _tensor("0", 1, 0, (1 << 13, 1 << 13), (0, 0))}, {"0": bytes(4)},
                      "more than this .*-byte file may unpack"),
}


def _hostile(tmp_path, name):
    entries, storages, _ = HOSTILE[name]
    return write_pt(tmp_path / f"{name.replace(' ', '_')}.pt", entries, storages)


@pytest.mark.parametrize("name", [n for n in HOSTILE if n != "overrun"])
def test_hostile_views_are_refused(tmp_path, name):
    with pytest.raises(UnsafePickleError, match=HOSTILE[name][2]) as e:
        load_torch_file(_hostile(tmp_path, name))
    assert str(tmp_path) in str(e.value) and " at 0x" not in str(e.value)


def test_view_past_its_storage_is_refused_without_crashing(tmp_path):
    """In a child process: before the fix a large overrun killed the process (SIGSEGV), a small one
    returned heap memory as tensor values."""
    small = _hostile(tmp_path, "overrun")
    large = write_pt(tmp_path / "large.pt", {"w": _tensor("0", 4, 0, (1 << 28,), (1,))}, {"0": bytes(16)})
    script = textwrap.dedent(f"""
        from sdonnx.adapters.torch_pickle import UnsafePickleError, load_torch_file
        for path in ({str(small)!r}, {str(large)!r}):
            try:
                load_torch_file(path)
                print("read")
            except UnsafePickleError as e:
                print("refused:", e)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused:") for line in lines), run.stdout
    assert "reaches element 7 of a storage of 4" in lines[0]
    assert "reaches element 268435455 of a storage of 4" in lines[1]


def test_tensor_from_something_else_than_a_storage_is_refused(tmp_path):
    """A tensor passed where a storage belongs (its own view rules would not bound the read)."""
    inner = _tensor("0", 4, 0, (4,), (1,))
    outer = b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple([inner, _int(0), _tuple([_int(16)]),
                                                            _tuple([_int(1)]), b"\x89", b"}"]) + b"R"
    path = write_pt(tmp_path / "nested.pt", {"w": outer}, {"0": bytes(16)})
    with pytest.raises(UnsafePickleError, match="not one of the file's storages"):
        load_torch_file(path)


def test_storage_type_cannot_be_rewritten_by_the_pickle(tmp_path):
    """BUILD on the storage-type stand-in (setting its name) is refused, not obeyed."""
    kind = b"ctorch\nFloatStorage\n" + b"}" + _str("name") + _str("Evil") + b"sb"  # {name: Evil}, BUILD
    storage = _tuple([_str("storage"), kind, _str("0"), _str("cpu"), _int(4)]) + b"Q"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple([storage, _int(0), _tuple([_int(4)]),
                                                             _tuple([_int(1)]), b"\x89", b"}"]) + b"R"
    with pytest.raises(UnsafePickleError, match="damaged or not a torch file"):
        load_torch_file(write_pt(tmp_path / "build.pt", {"w": tensor}, {"0": bytes(16)}))


ZIP_BOMB = 64 << 20  # what the bomb inflates to; the file is about 64 KB


@pytest.mark.parametrize("where", ["storage", "pickle"])
def test_zip_bomb_is_refused_before_it_is_inflated(tmp_path, where):
    """A deflated record inflating ~1000x is refused from its declared size, before any byte is
    inflated: peak Python memory (numpy's buffers included) stays far below the bomb."""
    numel = ZIP_BOMB // 4
    if where == "storage":
        path = write_pt(tmp_path / "bomb.pt", {"w": _tensor("0", numel, 0, (numel,), (1,))},
                        {"0": bytes(ZIP_BOMB)}, compress=zipfile.ZIP_DEFLATED)
    else:
        padding = _str("pad") + b"B" + ZIP_BOMB.to_bytes(4, "little") + bytes(ZIP_BOMB)  # BINBYTES
        path = write_pt(tmp_path / "bomb.pt", {}, {}, compress=zipfile.ZIP_DEFLATED,
                        pickle_bytes=b"\x80\x02}(" + padding + b"u.")
    assert path.stat().st_size < ZIP_BOMB // 500  # ~1000x, as deflate allows at most
    tracemalloc.start()
    try:
        with pytest.raises(UnsafePickleError, match="more than this .*-byte file may unpack to"):
            load_torch_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


class _CharTokenizer:
    """One token per character: enough for the database to index names."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_bad_files_in_the_embeddings_folder_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    from sdonnx.adapters.textual_inversion import EmbeddingDatabase, EmbeddingError, load_embedding

    folder = tmp_path / "embeddings"
    folder.mkdir()
    vec = np.arange(8, dtype=np.float32)
    write_pt(folder / "fine.pt", {"w": _tensor("0", 8, 0, (2, 4), (4, 1))}, {"0": vec.tobytes()})
    bad = [_hostile(folder, name) for name in ("overrun", "negative stride", "stride-0 bomb")]
    db = EmbeddingDatabase(folder, _CharTokenizer())
    with caplog.at_level(logging.WARNING):
        db.refresh()
    assert list(db.embeddings) == ["fine"]
    np.testing.assert_array_equal(db.embeddings["fine"].vectors, vec.reshape(2, 4))
    for path in bad:
        assert any(str(path) in r.getMessage() for r in caplog.records), path
    with pytest.raises(EmbeddingError, match="reaches element 7"):  # named directly: an error
        load_embedding(bad[0])


def test_bad_lora_named_in_a_prompt_is_a_clear_error(tmp_path):
    from sdonnx.adapters.lora import LoraError, LoraLibrary

    folder = tmp_path / "Lora"
    folder.mkdir()
    path = _hostile(folder, "negative stride")
    with pytest.raises(LoraError, match=f"{path}.*non-negative"):
        LoraLibrary(folder).get(path.stem)
