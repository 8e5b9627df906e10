"""Persistent XLA compilation cache, so repeated runs on one machine config skip the
several-second interpreter compile. Directory: $PLENA_JAX_CACHE, else ~/.cache/plena-jax;
set PLENA_JAX_CACHE=off to disable."""

from __future__ import annotations

import os
from pathlib import Path

import jax

_done = False


def enable_compilation_cache() -> str | None:
    global _done
    where = os.environ.get("PLENA_JAX_CACHE", str(Path.home() / ".cache" / "plena-jax"))
    if _done or where.lower() in ("off", "0", "none", ""):
        return None
    Path(where).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _done = True
    return where
