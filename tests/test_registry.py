"""Backend lookup, lazy framework imports and the NumPy fallback.

A framework's absence is simulated in a fresh interpreter by `sys.modules[name] = None`,
which makes `import name` fail exactly as if it were not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_core import MambaModule, get_backend
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, block: tuple[str, ...] = ()) -> dict:
    """Run `code` in a fresh interpreter with `block`ed frameworks; it prints one JSON line."""
    prelude = "import sys, json, warnings\n" + "".join(
        f"sys.modules[{name!r}] = None\n" for name in block
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown backend 'troch': expected 'auto' or one of \['jax', 'numpy', 'torch'\]",
    ):
        MambaModule(backend="troch")
    with pytest.raises(TypeError, match="backend must be a str"):
        get_backend(3)


def test_import_loads_no_framework():
    out = run_python(
        "import mamba_core\n"
        "m = mamba_core.MambaModule({'hidden_size': 8, 'd_state': 4}, backend='numpy')\n"
        "import numpy as np; m(np.ones((1, 3, 8)))\n"
        "print(json.dumps(sorted(k for k in ('jax', 'torch', 'flax', 'array_api_strict') if k in sys.modules)))"
    )
    assert out == []


@pytest.mark.parametrize("missing,extra", [("jax", "jax"), ("torch", "torch")])
def test_missing_backend_falls_back_to_numpy_with_a_warning(missing, extra):
    out = run_python(
        "import mamba_core, numpy as np\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    m = mamba_core.MambaModule({{'hidden_size': 8, 'd_state': 4}}, backend={missing!r})\n"
        "r = m(np.ones((1, 3, 8)))\n"
        "print(json.dumps({'warnings': [str(w.message) for w in caught],"
        " 'category': [w.category.__name__ for w in caught], 'metrics': r['metrics'],"
        " 'get_metrics': m.get_metrics()}))",
        block=(missing,),
    )
    assert len(out["warnings"]) == 1 and out["category"] == ["RuntimeWarning"]
    message = out["warnings"][0]
    assert message.startswith("Usando implementación fallback de Mamba")
    assert f"backend {missing!r} is not available" in message
    assert f"pip install 'mamba-core[{extra}]'" in message
    for metrics in (out["metrics"], out["get_metrics"]):
        assert metrics["backend"] == "numpy"
        assert metrics["requested_backend"] == missing
        assert metrics["fallback_used"] is True


def test_fallback_can_be_turned_into_an_error():
    out = run_python(
        "import mamba_core\n"
        "try:\n"
        "    mamba_core.MambaModule({'hidden_size': 8}, backend='jax', allow_fallback=False)\n"
        "    print(json.dumps(None))\n"
        "except ImportError as exc:\n"
        "    print(json.dumps(str(exc)))",
        block=("jax",),
    )
    assert out is not None and "backend 'jax' is not available" in out
    assert "pip install 'mamba-core[jax]'" in out


@pytest.mark.parametrize(
    "block,expected",
    [((), "jax"), (("jax",), "torch"), (("jax", "torch"), "numpy")],
)
def test_auto_prefers_jax_then_torch_then_numpy(block, expected):
    for name in {"jax", "torch"} - set(block):
        require(name)
    out = run_python(
        "import mamba_core\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    m = mamba_core.MambaModule({'hidden_size': 8, 'd_state': 4})\n"
        "print(json.dumps({'backend': m.backend_name, 'warnings': len(caught),"
        " 'fallback': m.get_metrics()['fallback_used']}))",
        block=block,
    )
    assert out == {"backend": expected, "warnings": 0, "fallback": False}
