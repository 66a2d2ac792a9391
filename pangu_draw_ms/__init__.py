"""pangu_draw_ms: PanGu-Draw (bilingual text-to-image latent diffusion) in MindSpore.

Importing the package caps oneDNN at AVX2 on AVX-512 CPUs (100x faster 3x3 convolutions on CPU; see
:mod:`pangu_draw_ms.runtime`), unless ``DNNL_MAX_CPU_ISA`` is already set, and on a host without an
accelerator launches ops synchronously (``MS_DEV_HOST_BLOCKING_RUN=1``: PyNative runs 10x faster there).
"""
from .runtime import configure_host_launch, configure_onednn

configure_onednn()
configure_host_launch()
