"""MoETune's engine: everything that computes. No UI code here."""

import os

# MoETune never downloads: models and tokenizers come from local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from .quiet import quiet_offline_kernel_notices  # noqa: E402

quiet_offline_kernel_notices()  # bitsandbytes' "kernels-community ... offline mode" lines (engine/quiet.py)
