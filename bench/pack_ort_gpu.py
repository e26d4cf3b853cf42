"""Pack an onnxruntime-gpu wheel small enough to carry to a GPU machine that cannot reach a registry.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d /tmp/ortgpu onnxruntime-gpu
    python bench/pack_ort_gpu.py /tmp/ortgpu/onnxruntime_gpu-*.whl --arch 90 --out .gpu --piece-mb 31

The wheel is ~255 MB, mostly the CUDA provider's fatbinaries for six GPU architectures. The cubins of the
other architectures are zeroed in place (their fatbin entry headers kept, so the CUDA driver still finds the
one it loads), the rest is tar.xz'ed (~62 MB for sm_90) and split into pieces that bench/device_check.sh
reassembles from .gpu/*/ (one piece per device call where a call carries at most 64 MiB).
"""
import argparse
import io
import lzma
import struct
import tarfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
DROP = ("libonnxruntime.so",)  # the C API library: the Python module links its own copy


def keep_arch(data, arch):
    """Zero every fatbin entry's payload whose target architecture is not `arch`; returns bytes zeroed."""
    zeroed, pos = 0, 0
    while (start := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header, size = struct.unpack_from("<HHQ", data, start + 4)
        if version != 1 or header != 16:
            pos = start + 4
            continue
        entry, end = start + header, start + header + size
        while entry < end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if struct.unpack_from("<I", data, entry + 28)[0] != arch:
                data[entry + entry_header:entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        pos = end
    return zeroed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("wheel")
    parser.add_argument("--arch", type=int, default=90, help="SM architecture to keep (90: H100/H200)")
    parser.add_argument("--out", default=".gpu")
    parser.add_argument("--piece-mb", type=int, default=31)
    args = parser.parse_args()
    buffer = io.BytesIO()
    with zipfile.ZipFile(args.wheel) as wheel, lzma.open(buffer, "wb", preset=6) as packed_stream, \
            tarfile.open(fileobj=packed_stream, mode="w") as tar:
        for info in wheel.infolist():
            if info.is_dir() or Path(info.filename).name.startswith(DROP):
                continue
            data = bytearray(wheel.read(info))
            if "providers_cuda" in info.filename:
                print(f"{info.filename}: zeroed {keep_arch(data, args.arch) / 1e6:.0f} MB of other architectures")
            member = tarfile.TarInfo(info.filename)
            member.size, member.mode = len(data), 0o755
            tar.addfile(member, io.BytesIO(bytes(data)))
    packed, piece = buffer.getvalue(), args.piece_mb << 20
    for i in range(0, len(packed), piece):
        folder = Path(args.out) / chr(ord("a") + i // piece)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"ort-gpu-sm{args.arch}.tar.xz.part{i // piece:02d}").write_bytes(packed[i:i + piece])
    print(f"{len(packed) / 1e6:.0f} MB in {(len(packed) + piece - 1) // piece} pieces under {args.out}/")


if __name__ == "__main__":
    main()
