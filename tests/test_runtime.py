"""Process settings: the oneDNN ISA cap (detected from the CPU, never over a user's value), blocking op launch
on CPU-only hosts, the compile-cache location, quiet logs, and the kernel thread count."""
import os
import subprocess
import sys

from pangu_draw_ms.runtime import (
    accelerator_present,
    compile_cache_root,
    configure_host_launch,
    configure_onednn,
    cpu_flags,
    cpu_threads,
    eager,
    on_cpu_threads,
    onednn_isa_cap,
    set_cpu_threads,
)

AVX512 = frozenset({"avx2", "avx512f", "avx512bw"})
AVX2_ONLY = frozenset({"avx2", "fma"})


def test_the_cap_is_set_only_on_x86_cpus_with_avx512_and_never_over_a_users_value():
    assert onednn_isa_cap({}, "x86_64", AVX512) == "AVX2"
    assert onednn_isa_cap({}, "AMD64", AVX512) == "AVX2"
    assert onednn_isa_cap({}, "x86_64", AVX2_ONLY) is None  # nothing to avoid: AVX2 is oneDNN's path there
    assert onednn_isa_cap({}, "aarch64", AVX512) is None    # Ascend hosts: the x86 ISA names do not apply
    assert onednn_isa_cap({"DNNL_MAX_CPU_ISA": "ALL"}, "x86_64", AVX512) is None
    assert onednn_isa_cap({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "x86_64", AVX512) is None
    environ = {}
    assert configure_onednn(environ) == environ.get("DNNL_MAX_CPU_ISA")  # it sets what it reports
    environ = {"DNNL_MAX_CPU_ISA": "ALL"}
    assert configure_onednn(environ) is None and environ == {"DNNL_MAX_CPU_ISA": "ALL"}


def test_lifting_the_cap_removes_only_what_the_package_set(monkeypatch):
    from pangu_draw_ms import runtime

    monkeypatch.setattr(runtime, "onednn_isa_cap", lambda environ: "AVX2")
    monkeypatch.setattr(runtime, "_process_cap", None)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert runtime.configure_onednn() == "AVX2" and os.environ["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert runtime.lift_onednn_cap() and "DNNL_MAX_CPU_ISA" not in os.environ
    assert not runtime.lift_onednn_cap()
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # the user's own value stays
    assert not runtime.lift_onednn_cap() and os.environ["DNNL_MAX_CPU_ISA"] == "AVX2"


def test_cpu_flags_read_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "avx512f"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_importing_the_package_sets_the_cap_unless_the_user_did():
    code = "import os, pangu_draw_ms; print(os.environ.get('DNNL_MAX_CPU_ISA'))"
    env = {k: v for k, v in os.environ.items() if k not in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected = "AVX2" if "avx512f" in cpu_flags() else "None"
    assert default.stdout.strip() == expected
    user = subprocess.run([sys.executable, "-c", code], env=dict(env, DNNL_MAX_CPU_ISA="ALL"), capture_output=True,
                          text=True, check=True)
    assert user.stdout.strip() == "ALL"


def test_blocking_launch_only_on_hosts_without_an_accelerator_and_never_over_a_users_value():
    def nothing(path):
        return False

    environ = {}
    assert configure_host_launch(environ, nothing) and environ == {"MS_DEV_HOST_BLOCKING_RUN": "1"}
    environ = {"MS_DEV_HOST_BLOCKING_RUN": "0"}
    assert not configure_host_launch(environ, nothing) and environ == {"MS_DEV_HOST_BLOCKING_RUN": "0"}
    ascend = {"ASCEND_HOME_PATH": "/usr/local/Ascend/ascend-toolkit/latest"}
    assert accelerator_present(ascend, nothing) and not configure_host_launch(ascend, nothing)
    assert "MS_DEV_HOST_BLOCKING_RUN" not in ascend
    for device in ("/dev/nvidia0", "/dev/davinci0", "/usr/local/Ascend"):
        environ = {}
        assert not configure_host_launch(environ, lambda path: path == device) and environ == {}


def test_importing_the_package_sets_blocking_launch_on_this_cpu_host():
    code = "import os, pangu_draw_ms; print(os.environ.get('MS_DEV_HOST_BLOCKING_RUN'))"
    env = {k: v for k, v in os.environ.items() if k != "MS_DEV_HOST_BLOCKING_RUN"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == ("None" if accelerator_present() else "1")
    user = subprocess.run([sys.executable, "-c", code], env=dict(env, MS_DEV_HOST_BLOCKING_RUN="0"),
                          capture_output=True, text=True, check=True)
    assert user.stdout.strip() == "0"


def test_compile_cache_location():
    assert compile_cache_root("off", {}) is None
    assert compile_cache_root("/c", {"PANGU_DRAW_COMPILE_CACHE": "/e"}) == "/c"
    assert compile_cache_root(None, {"PANGU_DRAW_COMPILE_CACHE": "off"}) is None
    assert compile_cache_root(None, {"XDG_CACHE_HOME": "/x"}) == os.path.join("/x", "pangu_draw_ms", "compile")


def test_eager_runs_the_block_in_pynative_and_restores_the_mode_even_after_an_error():
    import mindspore as ms
    import pytest

    ms.set_context(mode=ms.GRAPH_MODE)
    with pytest.raises(RuntimeError, match="inside"):
        with eager():
            assert ms.get_context("mode") == ms.PYNATIVE_MODE
            raise RuntimeError("inside")
    assert ms.get_context("mode") == ms.GRAPH_MODE


def test_cpu_threads_reach_every_listener_and_mindspore_keeps_its_first_count(monkeypatch):
    """set_cpu_threads updates the package's kernels (the listeners) on every call; MindSpore's own count, set
    once per process (here by tests/conftest.py), is left as it is instead of raising."""
    from mindspore._c_expression import RuntimeConf

    from pangu_draw_ms import runtime

    assert RuntimeConf.get_instance().is_op_threads_num_configured()
    saved = cpu_threads()
    heard = []
    monkeypatch.setattr(runtime, "_thread_listeners", [])
    on_cpu_threads(heard.append)
    try:
        set_cpu_threads(3)
        set_cpu_threads(0)  # at least one
        assert heard == [saved, 3, 1] and cpu_threads() == 1
    finally:
        set_cpu_threads(saved)
