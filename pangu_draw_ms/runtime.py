"""Process-wide settings that must be in place before MindSpore's kernels first run: the oneDNN ISA cap
on AVX-512 CPUs, blocking (synchronous) op launch on CPU-only hosts, quiet logs for our command-line entry
points, MindSpore's compile cache, and the CPU kernel thread count shared by MindSpore and the package's own
kernels (:func:`set_cpu_threads`); and :func:`eager`, a stretch of PYNATIVE_MODE inside any mode.

Why the cap. MindSpore's CPU convolutions go through its bundled oneDNN (3.10). On a CPU with AVX-512
oneDNN dispatches a float32 NCHW ("abcd") 3x3 convolution to ``jit_uni_ncsp:conv+ref:any`` - a reference
kernel - instead of the im2col + JIT GEMM it uses on AVX2: measured on a 2-core Xeon (Sapphire Rapids
class, AVX-512 + AMX) a (2, 64, 32, 32) 3x3 conv takes 285 ms by default and 3.7 ms with
``DNNL_MAX_CPU_ISA=AVX2`` (every AVX-512 level, AVX512_CORE up to AVX512_CORE_AMX, takes the slow path;
``bench/conv_isa.py`` prints the table and the kernel oneDNN picks). The slow path needs AVX-512, so the cap
is set only where the CPU has it; on AVX2-only CPUs it would change nothing, and on Arm (Ascend hosts) it
does not apply.

Why blocking launch. In PYNATIVE_MODE MindSpore hands every op to a pipeline of runtime threads (5 by
default) that wait for work by spinning (``AsyncRQueue::Wait`` and ``WorkerLoop`` take 65% of the CPU
samples of a PyNative loop under ``perf``). On a host whose only device is the CPU those threads take the
cores from the kernels they wait for: on the 2-core Xeon a Dense on (2, 64, 32) takes 4.8 ms per call
asynchronously and 0.15 ms with ``MS_DEV_HOST_BLOCKING_RUN=1`` (what ``mindspore.runtime.launch_blocking()``
switches on), the tiny UNet's PyNative forward 1.43 s and 0.16 s; GRAPH_MODE runs are unchanged (demo
image 1.21 s vs 1.30 s warm, within noise). ``mindspore.runtime.dispatch_threads_num(1)`` does not help
(7.4 ms). On Ascend the asynchronous pipeline overlaps host and device work, so the setting is made only
where there is no accelerator: no Ascend toolkit (``ASCEND_HOME_PATH``, ``ASCEND_OPP_PATH`` or
``/usr/local/Ascend``) and no NVIDIA device. MindSpore reads the variable when the first op runs.

oneDNN reads the variable when it first dispatches a kernel, so setting it at package import works even
after ``import mindspore`` as long as no convolution has run yet. A value the user set
(``DNNL_MAX_CPU_ISA`` or ``ONEDNN_MAX_CPU_ISA``) is never overridden: ``DNNL_MAX_CPU_ISA=ALL`` turns the
cap off; likewise ``MS_DEV_HOST_BLOCKING_RUN=0`` keeps MindSpore's asynchronous launch.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import platform
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

ISA_CAP = "AVX2"
ISA_VARIABLES = ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty where it does not exist)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_isa_cap(environ=os.environ, machine: Optional[str] = None, flags: Optional[frozenset] = None
                   ) -> Optional[str]:
    """The ISA cap to set: ``AVX2`` on an x86-64 CPU with AVX-512 unless the user set one; else None."""
    if any(name in environ for name in ISA_VARIABLES):
        return None
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags() if flags is None else flags
    return ISA_CAP if "avx512f" in flags else None


_process_cap: Optional[str] = None  # the cap configure_onednn set in this process's environment, if any


def configure_onednn(environ=os.environ) -> Optional[str]:
    """Set the oneDNN ISA cap in ``environ`` where :func:`onednn_isa_cap` says so; returns what was set."""
    global _process_cap
    cap = onednn_isa_cap(environ)
    if cap is not None:
        environ["DNNL_MAX_CPU_ISA"] = cap
        if environ is os.environ:
            _process_cap = cap
    return cap


def onednn_cap_is_the_packages() -> bool:
    """Whether this process's oneDNN cap is the one :func:`configure_onednn` set (not a user's value, not lifted)."""
    return _process_cap is not None and os.environ.get("DNNL_MAX_CPU_ISA") == _process_cap


def lift_onednn_cap() -> bool:
    """Remove the cap :func:`configure_onednn` put in this process's environment (never a user's value); returns
    whether there was one. Every oneDNN in the process reads the variable when it first runs a kernel - torch's
    bundled copy too, whose 3x3 convolutions the cap slows 1.8x (they take the fast path with AVX-512). So one
    MindSpore convolution runs first, which makes MindSpore's oneDNN read (and keep) the cap; torch's then runs
    at its own default. For benchmarks and tests that time or run torch beside MindSpore."""
    global _process_cap
    if not onednn_cap_is_the_packages():
        return False
    import mindspore as ms
    import numpy as np

    with eager():
        probe = ms.Tensor(np.zeros((1, 1, 3, 3), np.float32))
        ms.ops.conv2d(probe, probe, pad_mode="pad", padding=1).asnumpy()
    del os.environ["DNNL_MAX_CPU_ISA"]
    _process_cap = None
    return True


_cpu_threads: Optional[int] = None  # set_cpu_threads' count, if called
_thread_listeners: list = []


def cpu_threads() -> int:
    """Kernel threads on the CPU: :func:`set_cpu_threads`' count, else the cores this process may run on
    (MindSpore's own default, below its limit of 25)."""
    if _cpu_threads is not None:
        return _cpu_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def on_cpu_threads(listener: Callable[[int], None]) -> None:
    """Call ``listener`` with :func:`cpu_threads` now and whenever :func:`set_cpu_threads` changes it (the
    package's own CPU kernels, models/cpu_kernels.py, keep their thread count this way)."""
    _thread_listeners.append(listener)
    listener(cpu_threads())


def set_cpu_threads(count: int) -> None:
    """The CPU kernel threads of MindSpore (``device_context.cpu.op_tuning.threads_num``) and of the package's
    own kernels. MindSpore takes its setting once per process: a later call changes only the package's. At one
    thread MindSpore 2.9 still runs its matrix products on two (its actor thread and a kernel thread); only the
    process's CPU affinity (``taskset``, msrun's ``--bind_core``) holds it to one core."""
    global _cpu_threads
    _cpu_threads = max(1, int(count))
    for listener in _thread_listeners:
        listener(_cpu_threads)
    import mindspore as ms
    from mindspore._c_expression import RuntimeConf

    if not RuntimeConf.get_instance().is_op_threads_num_configured():
        ms.device_context.cpu.op_tuning.threads_num(_cpu_threads)


HOST_BLOCKING_VARIABLE = "MS_DEV_HOST_BLOCKING_RUN"
ASCEND_TOOLKIT_VARIABLES = ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH", "ASCEND_TOOLKIT_HOME")
ACCELERATOR_PATHS = ("/usr/local/Ascend", "/dev/nvidia0", "/dev/davinci0")


def accelerator_present(environ=os.environ, exists=os.path.exists) -> bool:
    """Whether this host has an Ascend toolkit or device, or an NVIDIA device, that MindSpore could run on."""
    return any(environ.get(name) for name in ASCEND_TOOLKIT_VARIABLES) or any(exists(p) for p in ACCELERATOR_PATHS)


def configure_host_launch(environ=os.environ, exists=os.path.exists) -> bool:
    """Blocking op launch (``MS_DEV_HOST_BLOCKING_RUN=1``) on a CPU-only host unless the user set the variable;
    returns whether it was set here."""
    if HOST_BLOCKING_VARIABLE in environ or accelerator_present(environ, exists):
        return False
    environ[HOST_BLOCKING_VARIABLE] = "1"
    return True


def launched_by_msrun() -> bool:
    """Whether this process is one of an ``msrun`` job's (a worker, or the scheduler)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def msrun_rank_and_world():
    """(rank, world) of this msrun worker (communication initialised), (0, 1) outside msrun, and
    (None, 1) in msrun's scheduler process, which coordinates the workers and does no work of its own."""
    if not launched_by_msrun():
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return None, 1
    return get_rank(), get_group_size()


def quiet_mindspore(verbose: bool = False) -> None:
    """MindSpore's C++/Python log level for a command-line run (``GLOG_v``: 3 = errors only, 1 = info with
    ``verbose``) unless the user set it; MindSpore reads it once, at import, so call this before."""
    os.environ.setdefault("GLOG_v", "1" if verbose else "3")


def configure_logging(verbose: bool = False) -> None:
    """Log levels for a command-line run: :func:`quiet_mindspore`, our Python loggers at WARNING (INFO with
    ``verbose``), and jieba's debug lines ("Building prefix dict ...") hidden."""
    quiet_mindspore(verbose)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jieba").setLevel(logging.DEBUG if verbose else logging.WARNING)


def compile_cache_root(setting: Optional[str], environ=os.environ) -> Optional[str]:
    """Where compiled graphs are cached across processes: ``setting`` (a folder, or "off"), else
    ``$PANGU_DRAW_COMPILE_CACHE`` (likewise), else ``$XDG_CACHE_HOME/pangu_draw_ms/compile`` (``~/.cache``)."""
    setting = setting or environ.get("PANGU_DRAW_COMPILE_CACHE")
    if setting == "off":
        return None
    if setting:
        return setting
    return os.path.join(cache_home(environ), "pangu_draw_ms", "compile")


def cache_home(environ=os.environ) -> str:
    """``$XDG_CACHE_HOME``, else ``~/.cache``: where the compile cache and the built CPU kernels live."""
    return environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def enable_compile_cache(root: str, run_key: dict) -> str:
    """Turn on MindSpore's compile cache in a folder of ``root`` that belongs to ``run_key``; returns it.

    Why a folder per key: MindSpore's cache names graphs by their compile order (``compile_cache_N.mindir``)
    and checks only a hash of the source files, so a process that compiles other graphs, or the same ones
    in another order, loads the wrong graph (measured: a two-prompt run after a one-prompt run into one
    cache folder failed with mis-shaped text encodings). ``run_key`` must hold everything that decides which
    graphs a run compiles and in which order (model, sizes, batch layout, guidance branches, sampler, ...);
    then every process that uses a folder compiles the same sequence. Parameters are not stored in the
    cache: new weights under the same key are read as usual."""
    digest = hashlib.sha256(json.dumps(run_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(root, digest)
    import mindspore as ms

    ms.set_context(enable_compile_cache=True, compile_cache_path=path)
    return path


def freeze_heap() -> None:
    """Collect garbage, then exempt every object alive now from Python's cyclic garbage collector (``gc.freeze``).

    MindSpore runs a full ``gc.collect()`` before it compiles each graph, which walks every object in the process:
    85 ms per graph in ``tools/infer.py`` (five graphs: 0.4 s of a 4-5 s run), 0.3 s in a test process that has
    torch and diffusers loaded. After the freeze it walks only what was made since. For a command-line run, once
    its networks are built (they live until the process ends); frozen objects are still freed when their last
    reference goes, only a reference cycle among them would stay."""
    gc.collect()
    gc.freeze()


@contextmanager
def eager() -> Iterator[None]:
    """Run the block in PYNATIVE_MODE and restore the mode after: for a one-off call (output shapes, a FLOP
    count, a reference) that would otherwise compile a graph of its own in GRAPH_MODE."""
    import mindspore as ms

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=mode)
