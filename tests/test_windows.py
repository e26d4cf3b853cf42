"""Nothing on the runtime path assumes Linux: the POSIX-only calls are guarded, and these tests run the
guarded paths with the platform checks forced both ways (this machine is Linux)."""
import builtins
import ctypes
import errno
import os
import platform
import subprocess
import sys
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np
import pytest
from PIL import Image

from sdonnx.image import save_png
from sdonnx.manifest import relative_path
from sdonnx.runtime import providers, session


def test_manifest_paths_use_slashes_whichever_os_converted():
    assert relative_path(PureWindowsPath(r"C:\models\staging\unet\model.onnx"), PureWindowsPath(r"C:\models\staging")) \
        == "unet/model.onnx"
    assert relative_path(PurePosixPath("/m/staging/unet/optimized/model.onnx"), PurePosixPath("/m/staging")) \
        == "unet/optimized/model.onnx"


def test_malloc_trim_only_where_glibc_has_it(monkeypatch):
    def no_libc(name):
        raise AssertionError(f"{name} loaded on a platform without it")

    with monkeypatch.context() as patched:
        patched.setattr(ctypes, "CDLL", no_libc)
        assert session.trim_heap("win32") is False and session.trim_heap("darwin") is False
    if platform.libc_ver()[0] == "glibc":
        assert session.trim_heap("linux") is True
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: not found")))
    assert session.trim_heap("linux") is False  # musl: no libc.so.6


def test_physical_cores_without_proc_cpuinfo(monkeypatch):
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert session.physical_cores() == max(1, (os.cpu_count() or 2) // 2)


def test_thread_count_per_platform(monkeypatch):
    monkeypatch.delenv("SDONNX_THREADS", raising=False)
    assert session.thread_count("linux") == session.physical_cores()
    assert session.thread_count("win32") == 0  # onnxruntime counts physical cores through the OS
    monkeypatch.setenv("SDONNX_THREADS", "3")
    assert session.thread_count("win32") == session.thread_count("linux") == 3


def test_sessions_start_where_stderr_cannot_be_swapped(monkeypatch):
    """pythonw on Windows has no console: fd 2 cannot be duplicated; sessions still start, unchecked log."""
    def no_fd(fd):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(os, "dup", no_fd)
    with session.native_log() as logged:
        pass
    assert logged == []
    made = session.start_session(providers.tiny_model(), None, [("CPUExecutionProvider", {})])
    assert made.get_providers() == ["CPUExecutionProvider"]


def test_png_saved_where_hard_links_fail_with_einval(tmp_path, monkeypatch):
    """Windows answers os.link on FAT/exFAT with ERROR_INVALID_FUNCTION, which Python maps to EINVAL."""
    def fat_link(src, dst):
        raise OSError(errno.EINVAL, "Incorrect function")

    monkeypatch.setattr(os, "link", fat_link)
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    first = save_png(image, tmp_path, "a cube", seed=1)
    second = save_png(image, tmp_path, "a cube", seed=1)
    assert (first.name, second.name) == ("00000-1.png", "00001-1.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png", "00001-1.png"]


def test_cli_on_a_console_that_cannot_print_unicode(tiny_onnx, tmp_path):
    """A legacy console's code page (here: ASCII) must not break the progress bar or the printed paths."""
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONUTF8": "0"}
    outdir = tmp_path / "Ausgabe-\u00fc\u2603"
    done = subprocess.run([sys.executable, "-m", "sdonnx.cli", "-v", "generate", "-m", str(tiny_onnx("sd1")),
                           "ein W\u00fcrfel \u2603", "--steps", "2", "-W", "64", "-H", "64", "--seed", "1",
                           "--provider", "cpu", "-o", str(outdir)],
                          capture_output=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert [p.name for p in outdir.iterdir()] == ["00000-1.png"]
    assert b"unet: runs on CPUExecutionProvider (device CPU)" in done.stderr
