"""Library messages a user cannot act on, silenced at their source and nothing else: bitsandbytes tries, on every
CPU import, to fetch its optional `kernels-community/quantization-bitsandbytes` CPU kernel from the Hugging Face Hub,
which MoETune keeps offline (HF_HUB_OFFLINE=1), and logs two warnings about it (the `kernels` package's "Skipping
publisher trust check ... offline mode" and bitsandbytes' "Failed to load CPU gemm_4bit_forward from
kernels-community ..."); bitsandbytes then uses its own CPU code, which is what MoETune tests against. Only records
that name that kernel repository are dropped; every other warning of these loggers still shows."""

from __future__ import annotations

import logging

KERNEL_REPO = "kernels-community/"
#: the loggers that print the two lines (bitsandbytes' CPU backend, the `kernels` package's Hub access)
LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


class _OfflineKernelNotice(logging.Filter):
    """Drops a record about fetching a kernels-community kernel; keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format: not ours to judge
            return True
        return KERNEL_REPO not in text


def quiet_offline_kernel_notices() -> None:
    """Install the filter on the two loggers (once; before bitsandbytes is imported)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OfflineKernelNotice) for f in logger.filters):
            logger.addFilter(_OfflineKernelNotice())
