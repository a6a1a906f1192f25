"""`memfit report`: what memfit finds on this machine, one `name ..... value` line per fact, for bug
reports and for checking an install (DeepSpeed users know the idea from ds_report).

It names the memfit, python and torch in use (version and path), the torch build and its CUDA
devices, whether the native extension is built (and why not), the I/O backends and the one `auto`
picks, why io_uring is unavailable when it is, the CPU's vector features, and the limits that host
offload and snapshots run into: /dev/shm and RLIMIT_MEMLOCK."""

import ctypes
import errno
import os
import platform
import resource
import sys
import warnings

from memfit.units import format_bytes

NAME_WIDTH = 24
CPU_FEATURES = {
    "AVX2": "avx2",
    "FMA": "fma",
    "AVX-512F": "avx512f",
    "AVX512-BF16": "avx512_bf16",
    "AMX-BF16": "amx_bf16",
}
BUILD_STATUS_FILE = "_native_build.txt"  # written by setup.py when the extension could not be built
PURE_PYTHON = "memfit runs on its pure-Python fallbacks"
SMALL_SHM_BYTES = 1 << 30

# io_uring_setup(2): the same number on x86-64 and arm64; the feature bit that IORING_OP_READ and
# IORING_OP_WRITE arrived with (Linux 5.6), which memfit's engine requires
IO_URING_SETUP_SYSCALL = {"x86_64": 425, "aarch64": 425}
IORING_FEAT_RW_CUR_POS = 1 << 3
IO_URING_PARAMS_WORDS = 30  # struct io_uring_params is 120 bytes; features is word 5


def run() -> int:
    for name, value in collect():
        print(f"{name} {'.' * (NAME_WIDTH - len(name))} {value}")
    return 0


def collect() -> list[tuple[str, str]]:
    import torch

    import memfit

    rows = [
        ("memfit", f"{memfit.__version__} at {os.path.dirname(os.path.abspath(memfit.__file__))}"),
        ("python", f"{platform.python_version()} at {sys.executable}"),
        ("torch", f"{torch.__version__}, {torch_build(torch)}, at {os.path.dirname(torch.__file__)}"),
        ("CUDA devices", cuda_devices(torch)),
    ]
    rows.append(("native extension", native_extension()))
    rows += io_rows()
    rows += cpu_rows()
    rows.append(("Adam kernel ISA", adam_isa()))
    rows.append(("/dev/shm", shared_memory()))
    rows.append(("RLIMIT_MEMLOCK", memlock_limit()))
    return rows


def torch_build(torch) -> str:
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    return "CPU build"


def cuda_devices(torch) -> str:
    if not torch.cuda.is_available():
        return "none" if not torch.version.cuda else "none usable (torch.cuda.is_available() is False)"
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(f"{index}: {props.name} (sm_{props.major}{props.minor}, {format_bytes(props.total_memory)})")
    return "; ".join(devices)


def native_extension() -> str:
    if os.environ.get("MEMFIT_NO_EXT") == "1":
        return f"disabled by MEMFIT_NO_EXT=1; {PURE_PYTHON}"
    try:
        from memfit import _C
    except ImportError as error:
        recorded = _recorded_build_failure()
        reason = f"not built at install: {recorded}" if recorded else f"cannot be loaded ({error})"
        return f"{reason}; {PURE_PYTHON}"
    package_dir = os.path.dirname(os.path.abspath(sys.modules["memfit"].__file__))
    if os.path.dirname(os.path.abspath(_C.__file__)) != package_dir:  # another install's import hook supplied it
        return f"built: {_C.__file__}, which belongs to another memfit install than {package_dir}"
    return f"built: {_C.__file__}"


def _recorded_build_failure() -> str | None:
    import memfit

    path = os.path.join(os.path.dirname(os.path.abspath(memfit.__file__)), BUILD_STATUS_FILE)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def io_rows() -> list[tuple[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing extension is reported above, with its reason
        from memfit.io import available_backends, backend, native
    try:
        chosen = backend()
    except ValueError as error:
        chosen = f"nothing ({error})"
    requested = os.environ.get("MEMFIT_IO_BACKEND")
    if requested:
        chosen += f" (MEMFIT_IO_BACKEND={requested})"
    if native._C is None:
        uring = "not used without the native extension"
    elif native.uring_available():
        uring = "available"
    else:
        uring = f"unavailable: {io_uring_refusal()}"
    return [("I/O backends", f"{', '.join(available_backends())}; auto picks {chosen}"), ("io_uring", uring)]


def io_uring_refusal() -> str:
    """Why the kernel gives no usable io_uring, found by asking it for a ring directly."""
    syscall_number = IO_URING_SETUP_SYSCALL.get(platform.machine())
    if syscall_number is None:
        return f"the reason is not probed on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    params = (ctypes.c_uint32 * IO_URING_PARAMS_WORDS)()
    fd = libc.syscall(syscall_number, 4, ctypes.byref(params))
    if fd < 0:
        code = ctypes.get_errno()
        reason = f"io_uring_setup fails with {errno.errorcode.get(code, code)} ({os.strerror(code)})"
        disabled = _read_first_line("/proc/sys/kernel/io_uring_disabled")
        if disabled not in (None, "0"):
            return f"{reason}: kernel.io_uring_disabled = {disabled}"
        if code in (errno.EPERM, errno.ENOSYS):
            return f"{reason}: a seccomp filter (common in containers) or a kernel without io_uring"
        return reason
    os.close(fd)
    if not params[5] & IORING_FEAT_RW_CUR_POS:
        return "the kernel's io_uring predates Linux 5.6 (no IORING_OP_READ/WRITE)"
    return "the kernel grants a ring, but memfit's engine could not start one"


def cpu_rows() -> list[tuple[str, str]]:
    flags, model = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "model name" and model is None:
                    model = value.strip()
    except OSError:
        return [("CPU", f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")]
    features = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in CPU_FEATURES.items())
    return [
        ("CPU", f"{model or platform.machine()}, {os.cpu_count()} logical CPUs"),
        ("CPU vector features", features),
    ]


def adam_isa() -> str:
    """The level the fused CPU Adam step runs at (chosen from the CPU, or forced with
    MEMFIT_ADAM_ISA; "torch" is the fallback without the extension) and the levels available."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing extension is reported above, with its reason
            from memfit.optim.fused_adam import adam_isa as level_in_use
            from memfit.optim.fused_adam import available_adam_isas
    except ValueError as error:  # a malformed MEMFIT_ADAM_ISA
        return f"unknown ({error})"
    return f"{level_in_use()} (available: {', '.join(available_adam_isas())})"


def shared_memory() -> str:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError as error:
        return f"unavailable ({error.strerror})"
    total_bytes = stats.f_frsize * stats.f_blocks
    text = f"{format_bytes(total_bytes)}, {format_bytes(stats.f_frsize * stats.f_bavail)} free"
    if total_bytes < SMALL_SHM_BYTES:
        text += "; small (containers default to 64 MiB: raise it, e.g. docker run --shm-size 16g)"
    return text


def memlock_limit() -> str:
    limits = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    shown = ["unlimited" if limit == resource.RLIM_INFINITY else format_bytes(limit) for limit in limits]
    return " / ".join(shown) + " (soft / hard)"


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None
