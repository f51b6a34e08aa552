"""Native CPU kernels: the C++ sources in `csrc/cpu/`, built at first use and loaded as `torch.ops.padengine.*`
(`csrc.ops` gives them the torch references' signatures; `padengine.kernels` names them "cpp").

The build runs ninja through `torch.utils.cpp_extension`, once per machine, into
`$PADENGINE_CACHE/kernels/<key>/` (default `~/.cache/padengine`), where the key hashes the sources, the
flags, torch's and Python's versions and the CPU's instruction sets; later processes load the cached
library. Built at first use rather than ahead of time in setup.py because then `pip install -e` needs no
compiler, `-march=native` is safe (the machine that builds is the machine that runs, and a cache shared
with another CPU gets another key), and a missing or broken compiler costs a fallback (`load` raises
`NativeUnavailable` saying why) rather than a failed install. Each build goes into a fresh folder and
the library is renamed into place, so processes building at once never see half a file.
"""
import contextlib
import glob
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings

import torch

logger = logging.getLogger(__name__)

NAME = "padengine_cpu"
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu")
SOURCES = sorted(glob.glob(os.path.join(HERE, "*.cpp")))
HEADERS = sorted(glob.glob(os.path.join(HERE, "*.h")))

_lock = threading.Lock()
_state: dict = {}       # "loaded": path, or "error": why not


class NativeUnavailable(RuntimeError):
    """The C++ kernels cannot be built or loaded here; the message says why."""


def cflags() -> list[str]:
    """-O3, OpenMP (at::parallel_for runs on it) and the building machine's own instruction sets."""
    arch = {"x86_64": ["-march=native"], "AMD64": ["-march=native"], "aarch64": ["-mcpu=native"]}
    return ["-O3", "-fopenmp", "-DNDEBUG"] + arch.get(platform.machine(), [])


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def cache_key() -> str:
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    for part in (" ".join(cflags()), torch.__version__, sys.version.split()[0], platform.machine(), _cpu_features()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_path(cache: str | None = None) -> str:
    from padengine.default_model import cache_dir
    return os.path.join(cache or cache_dir(), "kernels", cache_key(), NAME + ".so")


def load(cache: str | None = None) -> None:
    """Make `torch.ops.padengine.*` available, building the library if this machine has none cached.
    Once per process: a failure is remembered (and logged once) and raised again as NativeUnavailable."""
    with _lock:
        if "error" in _state:
            raise NativeUnavailable(_state["error"])
        if "loaded" in _state:
            return
        try:
            path = library_path(cache)
            if os.path.isfile(path):
                torch.ops.load_library(path)
            else:
                _build(path)
            _state["loaded"] = path
        except Exception as e:      # a compiler missing or failing, ninja missing, a library that won't load
            _state["error"] = _reason(e)
            logger.warning("C++ CPU kernels unavailable, the torch ones run instead: %s", _state["error"])
            raise NativeUnavailable(_state["error"]) from e


def _build(path: str) -> None:
    """Compile into a fresh folder beside `path` (cpp_extension loads the result), then rename it into place."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler: {compiler!r} is not found (install g++, or set CXX)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    work = tempfile.mkdtemp(prefix="build-", dir=os.path.dirname(path))
    logger.info("building the C++ CPU kernels (once on this machine) in %s", work)
    try:
        with _ninja_on_path(), _quiet(logging.getLogger("torch.utils.cpp_extension")), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # cpp_extension's notes on compiler versions; failures raise
            built = cpp_extension.load(NAME, SOURCES, extra_cflags=cflags(), extra_ldflags=["-fopenmp"],
                                       build_directory=work, is_python_module=False, verbose=False)
        os.replace(built, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _ninja_on_path():
    """cpp_extension runs `ninja` from PATH; the pip package installs it beside this interpreter, which a
    process started as .venv/bin/python does not have on PATH."""
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError):
        import ninja
        dirs.append(ninja.BIN_DIR)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join(dirs + [old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _quiet(log: logging.Logger):
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _reason(e: Exception) -> str:
    """One line out of a failure: the compiler's first error (ninja's progress, FAILED and command lines
    skipped), else its first message, else the exception's last line."""
    if isinstance(e, NativeUnavailable):
        return str(e)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines[1:] if not line.startswith(("[", "FAILED:", "ninja:")) and " -o " not in line]
    line = next((x for x in said if "error" in x.lower()), said[0] if said else lines[-1] if lines else "")
    return f"the build failed: {line or type(e).__name__}"[:300]
