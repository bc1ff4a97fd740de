"""Runtime backends, installed as `mamba_core.backends`.

Each module here imports its framework at import time, so it is imported only when its
backend is asked for (see `mamba_core.registry`).  Every module exposes `get_backend()`.
"""
