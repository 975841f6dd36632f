"""The on-disk cache of quantised experts, one folder per checkpoint and quant setting, keyed by the
checkpoint's identity and weight files; a manifest lists its layers, each a saved store (engine.model.store_files)
checked against its SHA-256 when read, so a second run skips the quantisation and a damaged layer is redone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .hf_checkpoint import base_identity, checkpoint_files, read_config
from .store_files import FORMAT_VERSION, QuantCacheError
from .stores import BLOCKSIZE, DenseExpertStore, ExpertStoreT, NF4ExpertStore

#: the file of a cache folder that lists its layers and the key it was built for
MANIFEST = "manifest.json"


# ---- streaming quantisation ----------------------------------------------------------------------
def cache_key(path: str | Path, quant: str = "nf4", blocksize: int = BLOCKSIZE) -> dict:
    """What a quantised-expert cache folder must match: the checkpoint's identity (engine.model.hf_checkpoint.base_identity),
    its weight files (name, size, modification time) and the quantisation settings."""
    files = [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
             for f in checkpoint_files(path)]
    return {"format_version": FORMAT_VERSION, "identity": base_identity(path), "files": files,
            "quant": quant, "blocksize": blocksize}


def cache_folder(path: str | Path, cache_dir: str | Path, quant: str = "nf4", blocksize: int = BLOCKSIZE) -> Path:
    """The folder under `cache_dir` that holds (or will hold) the quantised experts of a checkpoint."""
    key = cache_key(path, quant, blocksize)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['identity']['model_type']}-{quant}-{digest}"


@dataclass
class CachedExperts:
    """What a matching cache folder gave back: the layers read intact (checksums verified), and the layers to
    quantise again, each with the reason (damaged, no checksum, missing)."""

    stores: dict[int, "ExpertStoreT"]
    redo: dict[int, str]


def load_cached_experts(path: str | Path, cache_dir: str | Path, quant: str = "nf4",
                        blocksize: int = BLOCKSIZE) -> CachedExperts | None:
    """The cached stores of a checkpoint's MoE layers, each checked against the checksum written with it, and
    the layers to quantise again; None when no cache folder matches the checkpoint (none yet, or stale)."""
    folder = cache_folder(path, cache_dir, quant, blocksize)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    config, family = read_config(path)
    layers = list(family.facts(config).moe_layers)
    try:
        info = json.loads(manifest.read_text())
        if not isinstance(info, dict) or info.get("key") != json.loads(json.dumps(cache_key(path, quant, blocksize))):
            return None
        listed = {int(layer) for layer in info["layers"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        return CachedExperts({}, {l: f"{manifest} is damaged ({e})" for l in layers})
    cls = NF4ExpertStore if quant == "nf4" else DenseExpertStore
    out = CachedExperts({}, {})
    for layer in layers:
        sub = folder / f"layer-{layer:03d}"
        if layer not in listed:
            out.redo[layer] = f"{sub} is not in {manifest}"
            continue
        try:
            out.stores[layer] = cls.load(sub)
        except QuantCacheError as e:
            out.redo[layer] = str(e).rstrip(".")
    return out


CACHE_ENV = "MOETUNE_CACHE"


def default_cache_dir() -> Path:
    """Where quantised experts are cached between runs: $MOETUNE_CACHE, else ~/.cache/moetune."""
    import os

    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moetune").expanduser() / "experts"
