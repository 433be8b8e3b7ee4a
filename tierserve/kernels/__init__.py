"""Native CPU kernels (linear.cpp, attention.cpp, attention_shared.cpp, elementwise.cpp,
selection.cpp; module.cpp binds them; quant.cpp, its own module), compiled for this machine at
first use.

``cpu_ops()`` returns the compiled module, or None where it cannot be built (no C++
compiler, no ninja, TIERSERVE_KERNELS=0) or would not pay (a CPU without AVX-512, which
every fast path needs: their scalar fallbacks are slower than torch's own ops): callers then
take the plain torch path, which gives the same results to rounding. ``quant_ops()`` is the
packed-weight linear (Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K) and, for CPUs without the AVX-512 module,
float32 paged decode attention; built where the CPU has AVX2, FMA and F16C (every x86 CPU this
project runs on); without it packed weights are dequantized per call and decode attention
gathers its blocks through torch. Each build (~1 minute) is cached under ``$TIERSERVE_HOME/kernels`` keyed by
the source, the torch version, the flags, the CPU (model and instruction sets) and the Python
ABI, so later runs on the same machine load it in well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from tierserve.model.hub import tierserve_home

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("module.cpp", "linear.cpp", "attention.cpp",
                                    "attention_shared.cpp", "elementwise.cpp", "selection.cpp")]
HEADERS = [HERE / "common.h", HERE / "ops.h"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
MODULE_NAME = "tierserve_cpu_ops"
QUANT_SOURCES = [HERE / "quant.cpp", HERE / "elementwise.cpp"]  # its AVX2 and scalar loops
QUANT_MODULE_NAME = "tierserve_quant_ops"

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("TIERSERVE_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def cpu_ops():
    """The compiled kernel module, built on first call; None if disabled, not worth it on this
    CPU, or the build fails."""
    # TIERSERVE_KERNELS=force builds and uses them anyway (their scalar paths), e.g. to test the
    # fused forward on a machine without AVX-512.
    forced = os.environ.get("TIERSERVE_KERNELS", "").lower() == "force"
    return _module_once("module", MODULE_NAME, SOURCES,
                        lambda: None if forced else unsupported_reason(),
                        "tierserve CPU kernels not used: %s; using plain torch ops")


def quant_ops():
    """The packed-weight kernel module (quant.cpp), built on first call; None if disabled, the
    CPU lacks AVX2/FMA/F16C, or the build fails."""
    return _module_once("quant", QUANT_MODULE_NAME, QUANT_SOURCES, quant_unsupported_reason,
                        "packed-weight kernel not used: %s; packed weights are dequantized for "
                        "each matmul")


def _module_once(key: str, name: str, sources: list[Path], reason, unused_message: str):
    """Module ``name`` built (or loaded) once per process and kept under ``key``; None where
    kernels are disabled or ``reason()`` says why not (logged once with ``unused_message``)."""
    if not enabled():
        return None
    if key in _state:
        return _state[key]
    with _lock:
        if key not in _state:
            why = reason()
            if why is not None:
                logger.warning(unused_message, why)
            _state[key] = None if why is not None else _build(name, sources)
    return _state[key]


def quant_unsupported_reason() -> str | None:
    """Why the packed-weight kernel is not built on this CPU, or None where it is."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"it is written for x86 with AVX2, this is {machine}"
    missing = {"avx2", "fma", "f16c"} - cpu_flags()
    return f"this CPU lacks {', '.join(sorted(missing))}" if missing else None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is no such file)."""
    flags = next((line for line in cpu_identity().splitlines()
                  if line.startswith(("flags:", "Features:"))), "")
    return frozenset(flags.partition(":")[2].split())


def unsupported_reason() -> str | None:
    """Why the native kernels would not pay on this CPU, or None where they do."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"they are written for x86 with AVX-512, this is {machine}"
    if "avx512f" not in cpu_flags():
        return "this CPU has no AVX-512, which their fast paths need"
    return None


def onednn_bf16_supported() -> bool:
    """Whether oneDNN can reorder bfloat16 weights here (it asks for AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT, and raises without them)."""
    flags = cpu_flags()
    return {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags


def cpu_identity() -> str:
    """The CPU model and instruction-set flags. ``-march=native`` code built on one CPU can die
    with SIGILL on another (a shared $TIERSERVE_HOME, an image built elsewhere, a VM that hides
    AMX), so the build cache is keyed by this too."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and Arm spellings
    seen: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() in wanted:
            seen.setdefault(name.strip(), value.strip())
    return "\n".join(f"{name}: {value}" for name, value in sorted(seen.items()))


def build_key(sources: list[Path] = SOURCES) -> str:
    """The build cache's key: sources, torch version, flags, CPU and Python ABI."""
    texts = [path.read_text() for path in sources + HEADERS]
    # EXT_SUFFIX names the Python ABI (e.g. .cpython-311-x86_64-linux-gnu.so): venvs of two
    # Pythons can share one $TIERSERVE_HOME.
    parts = [*texts, torch.__version__, *CFLAGS, cpu_identity(),
             str(sysconfig.get_config_var("EXT_SUFFIX"))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _build(name: str = MODULE_NAME, sources: list[Path] = SOURCES):
    """Load the cached library ``name`` for its build key, compiling it first if there is none.

    NOTE: compiled in a private work folder and moved into place whole, under an flock that
    the kernel releases when its holder dies: a build interrupted by Ctrl-C leaves no half
    library and no lock behind (torch's own build lock is a plain file that, left behind by a
    killed build, makes every later start wait forever). A library already built is imported
    directly, without ninja, whatever checkout the sources are in.
    """
    cache_dir = tierserve_home() / "kernels" / build_key(sources)
    library = cache_dir / f"{name}.so"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        module = _load_cached(library, warn=False)
        if module is not None:
            return module
        with _exclusive(cache_dir / "build.lock"):
            module = _load_cached(library, warn=True)  # built by another process meanwhile?
            if module is not None:
                return module
            # Shown at the default log level: it explains a first start that takes longer.
            logger.warning("compiling tierserve's CPU kernels (%s) for this machine into %s "
                           "(once, about a minute)", name, cache_dir)
            for leftover in cache_dir.glob("build-*"):  # interrupted builds: we hold the lock
                shutil.rmtree(leftover, ignore_errors=True)
            return _compile(library, name, sources)
    except Exception as error:  # no compiler, no ninja, a compile error: fall back, say so
        logger.warning("tierserve CPU kernels %s unavailable (%s: %s); the torch path is used",
                       name, type(error).__name__,
                       str(error).splitlines()[0] if str(error) else "")
        return None


def _compile(library: Path, name: str, sources: list[Path]):
    from torch.utils.cpp_extension import load

    work = Path(tempfile.mkdtemp(prefix="build-", dir=library.parent))
    try:
        module = load(name=name, sources=[str(p) for p in sources],
                      extra_cflags=CFLAGS, extra_include_paths=[str(HERE)],
                      extra_ldflags=["-fopenmp"], build_directory=str(work), verbose=False)
        os.replace(work / library.name, library)  # atomic: later runs see all of it or none
        return module
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_cached(library: Path, warn: bool):
    """The cached library, or None where there is none or it does not load (then a build
    replaces it)."""
    if not library.exists():
        return None
    try:
        return _import(library)
    except ImportError as error:
        if warn:
            logger.warning("cached kernels %s do not load (%s); building them again", library,
                           error)
        return None


def _import(library: Path):
    spec = importlib.util.spec_from_file_location(library.stem, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive flock on ``path`` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
