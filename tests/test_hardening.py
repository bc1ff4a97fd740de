"""Regression tests for the hostile-user probe: checkpoints that survive interruption and
corruption, loads that check before they allocate, one state check and one input
normalisation on every entry point, no aliasing, no retained buffers, broken frameworks,
and the small holes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, MambaState, init_params
from mamba_core import io as ckpt_io
from tests.conftest import require, small_config
from tests.tolerances import to_np

ROOT = Path(__file__).resolve().parents[1]


def run_script(code: str, *, env: dict | None = None, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ 1. atomic saves
def _pair(seed: int, activation: str):
    """A same-shaped (config, module) pair that differs from the other in a non-shape field
    and in every weight, so a mixed load is detectable."""
    cfg = small_config(activation=activation)
    return cfg, MambaModule(cfg, backend="numpy", seed=seed)


def _which(directory: Path, candidates) -> str:
    """The name of the candidate the directory loads as, or fail on a mix."""
    loaded = MambaModule.from_pretrained(directory, backend="numpy")
    sd = loaded.state_dict()
    for name, (cfg, module) in candidates.items():
        same_weights = all(np.array_equal(sd[k], v) for k, v in module.state_dict().items())
        if same_weights:
            assert loaded.config == cfg, f"weights of {name} with another config: a mixed load"
            return name
    raise AssertionError("the loaded weights are neither the old nor the new ones")


@pytest.mark.parametrize("failing_write", [1, 2])
def test_a_save_that_fails_midway_leaves_old_or_new(tmp_path, monkeypatch, failing_write):
    old, new = _pair(1, "swish"), _pair(2, "gelu")
    target = tmp_path / "ckpt"
    old[1].save_pretrained(target)
    calls = {"n": 0}
    real = ckpt_io._write_synced

    def flaky(fd, data):  # writes half of the file, then the disk is "full"
        calls["n"] += 1
        if calls["n"] == failing_write:
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(ckpt_io, "_write_synced", flaky)
    with pytest.raises(OSError, match="No space left"):
        new[1].save_pretrained(target)
    monkeypatch.undo()
    assert files_in(target) == ["config.json", "model.safetensors"]  # no temporary files
    candidates = {"old": old, "new": new}
    if failing_write == 1:  # the weights write failed: nothing was replaced
        assert _which(target, candidates) == "old"
    else:  # the weights were replaced, config.json was not: the bound config wins
        with pytest.warns(RuntimeWarning, match="interrupted save"):
            assert _which(target, candidates) == "new"


def test_saves_killed_at_random_points_load_old_or_new(tmp_path):
    """A process saving two same-shaped checkpoints in turn, SIGKILLed at several points."""
    cfg_a, cfg_b = (
        MambaConfig(hidden_size=128, activation="swish"),
        MambaConfig(hidden_size=128, activation="gelu"),
    )
    target = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import sys
        from mamba_core import MambaModule, MambaConfig
        a = MambaModule(MambaConfig(hidden_size=128, activation="swish"), backend="numpy", seed=1)
        b = MambaModule(MambaConfig(hidden_size=128, activation="gelu"), backend="numpy", seed=2)
        a.save_pretrained({str(target)!r})
        print("ready", flush=True)
        while True:
            b.save_pretrained({str(target)!r})
            a.save_pretrained({str(target)!r})
        """
    )
    candidates = {
        "a": (cfg_a, MambaModule(cfg_a, backend="numpy", seed=1)),
        "b": (cfg_b, MambaModule(cfg_b, backend="numpy", seed=2)),
    }
    seen = set()
    delays = [0.0, 0.003, 0.007, 0.013, 0.021, 0.034, 0.055, 0.089]
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # a kill inside the sub-millisecond between naming the finished file and renaming
        # it can leave one complete hidden temporary; loading removes it (dead saver)
        assert [f for f in files_in(target) if not f.endswith(".tmp")] == [
            "config.json",
            "model.safetensors",
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a kill between the renames
            seen.add(_which(target, candidates))
        assert files_in(target) == ["config.json", "model.safetensors"]
    assert seen <= {"a", "b"}


def test_saved_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        MambaModule(small_config(), backend="numpy").save_pretrained(tmp_path / "c")
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "c" / name).stat().st_mode & 0o777 == 0o640, name


def test_stale_temporaries_of_dead_savers_are_removed(tmp_path):
    target = tmp_path / "c"
    target.mkdir()
    stale = target / ".model.safetensors.999999999.abcdef.tmp"  # no such process
    stale.write_bytes(b"x" * 100)
    MambaModule(small_config(), backend="numpy").save_pretrained(target)
    assert files_in(target) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------ 2. check before allocating
def _hostile_checkpoint(directory: Path) -> None:
    """A 4 KB-class weights file (no bound config) beside a config claiming hidden 8192."""
    require("safetensors")
    from safetensors.numpy import save_file

    directory.mkdir()
    small = init_params(MambaConfig(hidden_size=8, d_state=4), seed=0)
    save_file({k: v.astype(np.float32) for k, v in small.items()}, directory / "model.safetensors")
    meta = {"format": "mamba-core", "format_version": 1, "dtype": "float32"}
    meta["config"] = MambaConfig(hidden_size=8192, d_state=64).to_dict()
    (directory / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("loader", ["numpy", "jax", "torch", "MambaTorch", "MambaFlax"])
def test_hostile_config_is_refused_before_allocating(tmp_path, loader):
    require({"MambaTorch": "torch", "MambaFlax": "flax"}.get(loader, loader))
    _hostile_checkpoint(tmp_path / "evil")
    call = {
        "MambaTorch": "from mamba_core.backends.torch import MambaTorch as C\n"
        "load = lambda: C.from_pretrained(path)",
        "MambaFlax": "from mamba_core.backends.flax import MambaFlax as C\n"
        "load = lambda: C.from_pretrained(path)",
    }.get(loader, f"load = lambda: MambaModule.from_pretrained(path, backend={loader!r})")
    out = run_script(
        f"""
        import json, resource, time
        from mamba_core import MambaModule
        path = {str(tmp_path / "evil")!r}
        {call.replace(chr(10), chr(10) + "        ")}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            load()
            message = None
        except ValueError as exc:
            message = str(exc)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"message": message, "grown_kib": grown,
                           "seconds": time.perf_counter() - start}}))
        """
    )
    assert out["message"] is not None and "does not match the config" in out["message"]
    assert "model.safetensors" in out["message"] and "in_proj.weight" in out["message"]
    assert out["grown_kib"] < 64 * 1024, out  # the claimed model is 2.6 GB
    assert out["seconds"] < 5, out


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_loading_costs_the_model_once(tmp_path, backend_name):
    require(backend_name)
    cfg = MambaConfig(hidden_size=2048, d_state=16, dt_rank=64)
    MambaModule(cfg, backend="numpy").save_pretrained(tmp_path / "big")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    assert size > 90e6
    out = run_script(
        f"""
        import json, resource
        from mamba_core import MambaModule
        MambaModule({{"hidden_size": 8, "d_state": 4}}, backend={backend_name!r})  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = MambaModule.from_pretrained({str(tmp_path / "big")!r}, backend={backend_name!r})
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"grown_kib": grown}}))
        """
    )
    assert out["grown_kib"] * 1024 < 1.5 * size, (out, size)


# ------------------------------------------------------------------ 3. one state check
def _entry_points(cfg, rng):
    """name -> (forward(x, state) -> (y, state), step(x_t, state) -> (y, state))."""
    require("jax")
    require("torch")
    require("flax")
    import jax.numpy as jnp
    import torch

    from mamba_core.backends import jax as mj
    from mamba_core.backends.flax import MambaFlax
    from mamba_core.backends.torch import MambaTorch

    params = init_params(cfg, seed=3)
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    tmod = MambaTorch(cfg, state_dict=params)
    fmod = MambaFlax(cfg, state_dict=params)
    mods = {b: MambaModule(cfg, backend=b, state_dict=params) for b in ("numpy", "jax", "torch")}

    def module_fwd(m):
        return lambda x, s: (lambda r: (r["output"], r["state"]))(m(x, state=s))

    return {
        **{f"MambaModule[{b}]": (module_fwd(m), m.step) for b, m in mods.items()},
        "jax.forward": (
            lambda x, s: mj.forward(jparams, jnp.asarray(x, jnp.float32), cfg, s),
            lambda x, s: mj.step(jparams, s, jnp.asarray(x, jnp.float32), cfg),
        ),
        "MambaTorch": (
            lambda x, s: tmod(torch.as_tensor(x, dtype=torch.float32), state=s, return_state=True),
            lambda x, s: tmod.step(torch.as_tensor(x, dtype=torch.float32), s),
        ),
        "MambaFlax": (
            lambda x, s: fmod(jnp.asarray(x, jnp.float32), s, return_state=True),
            lambda x, s: fmod.step(jnp.asarray(x, jnp.float32), s),
        ),
    }


def test_every_entry_point_checks_and_accepts_states_alike(rng):
    cfg = small_config()
    e, k, n = cfg.d_inner, cfg.d_conv, cfg.d_state
    x = rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    conv = rng.standard_normal((2, e, k)).astype(np.float32)
    ssm = rng.standard_normal((2, e, n)).astype(np.float32)
    reference = MambaModule(cfg, backend="numpy", state_dict=init_params(cfg, 3))
    ref = reference(x, state=MambaState(conv, ssm))["output"]
    import torch

    for name, (fwd, step) in _entry_points(cfg, rng).items():
        # numpy arrays, torch tensors, a plain tuple, a mapping: all the same state
        for state in (
            MambaState(conv, ssm),
            (conv, ssm),
            {"conv_state": conv, "ssm_state": ssm},
            (torch.from_numpy(conv), torch.from_numpy(ssm)),
        ):
            y, new = fwd(x, state)
            np.testing.assert_allclose(to_np(y), to_np(ref), rtol=2e-5, atol=2e-6, err_msg=name)
            assert tuple(new.conv_state.shape) == (2, e, k)
        y_t, _ = step(x[:, 0], (conv, ssm))
        np.testing.assert_allclose(to_np(y_t), to_np(ref)[:, 0], rtol=2e-5, atol=2e-6)
        bad = {
            "K+1": (
                (np.zeros((2, e, k + 1), np.float32), ssm),
                ValueError,
                r"conv_state: expected shape \(2, 32, 4\)",
            ),
            "batch": ((conv[:1], ssm[:1]), ValueError, r"for a batch of 2"),
            "ssm": (
                (conv, np.zeros((2, e, n + 1), np.float32)),
                ValueError,
                r"ssm_state: expected shape \(2, 32, 8\)",
            ),
            "int": ((conv.astype(np.int32), ssm), TypeError, "real floating"),
            "triple": ((conv, ssm, ssm), TypeError, "state must be a MambaState"),
            "text": ("state", TypeError, "state must be a MambaState"),
        }
        for state, error, match in bad.values():
            with pytest.raises(error, match=match):
                fwd(x, state)
            with pytest.raises(error, match=match):
                step(x[:, 0], state)


def test_state_check_runs_at_trace_time_under_jit(rng):
    require("jax")
    import jax
    import jax.numpy as jnp

    from mamba_core.backends import jax as mj

    cfg = small_config()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in init_params(cfg, 0).items()}
    x = jnp.zeros((2, 3, cfg.hidden_size), jnp.float32)
    bad = (jnp.zeros((2, cfg.d_inner, cfg.d_conv + 1)), jnp.zeros((2, cfg.d_inner, cfg.d_state)))
    with pytest.raises(ValueError, match="conv_state: expected shape"):
        jax.jit(lambda p, v, s: mj.forward(p, v, cfg, s)[0])(params, x, bad)


# ------------------------------------------------------------------ 4. no aliasing
def test_state_dict_is_a_copy_and_caches_follow_the_weights(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, seed=4)
    x = rng.standard_normal((1, 6, cfg.hidden_size))
    before = to_np(module(x)["output"])
    module.step(x[:, 0])  # fills the decode cache (A = -exp(A_log))
    sd = module.state_dict()
    for value in sd.values():
        value[...] = 7.0
    np.testing.assert_array_equal(to_np(module(x)["output"]), before)
    # a change through the public API reaches forward and step alike
    sd = module.state_dict()
    sd["A_log"] = sd["A_log"] + 1.0
    module.load_state_dict(sd)
    state, ys = module.init_state(1), []
    for t in range(6):
        y, state = module.step(x[:, t], state)
        ys.append(to_np(y))
    np.testing.assert_allclose(np.stack(ys, 1), to_np(module(x)["output"]), rtol=1e-5, atol=1e-6)


def test_module_classes_return_copies():
    require("torch")
    require("flax")
    from mamba_core.backends.flax import MambaFlax
    from mamba_core.backends.torch import MambaTorch

    cfg = small_config()
    for module in (MambaTorch(cfg, seed=0), MambaFlax(cfg, seed=0)):
        sd = (
            module.numpy_state_dict()
            if hasattr(module, "numpy_state_dict")
            else module.state_dict()
        )
        sd["D"][...] = 5.0
        again = (
            module.numpy_state_dict()
            if hasattr(module, "numpy_state_dict")
            else module.state_dict()
        )
        np.testing.assert_array_equal(again["D"], np.ones(cfg.d_inner))


# ------------------------------------------------------------------ 5. states own their memory
def _owns(a) -> bool:
    if isinstance(a, np.ndarray):
        return a.base is None
    import torch

    if isinstance(a, torch.Tensor):
        return a._base is None and a.untyped_storage().nbytes() == a.numel() * a.element_size()
    return True  # JAX buffers are never views


@pytest.mark.parametrize("scan", ["linear", "associative", "cumulative"])
def test_states_do_not_retain_the_sequence_buffers(backend, scan, rng):
    cfg = small_config(scan_type=scan)
    module = MambaModule(cfg, backend=backend)
    result = module(rng.standard_normal((2, 40, cfg.hidden_size)))
    for a in result["state"]:
        assert _owns(a)
    _, state = module.step(rng.standard_normal((2, cfg.hidden_size)), result["state"])
    assert all(_owns(a) for a in state)


def test_torch_module_states_own_their_memory(rng):
    require("torch")
    import torch

    from mamba_core.backends.torch import MambaTorch

    model = MambaTorch(small_config(), seed=0)
    _, state = model(torch.randn(2, 50, 16), return_state=True)
    assert all(_owns(a) for a in state)


# ------------------------------------------------------------------ 6. broken frameworks
def _broken_package(root: Path, name: str, error: str) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise {error}\n")


def test_auto_skips_a_broken_framework_and_a_named_one_raises(tmp_path):
    _broken_package(tmp_path, "jax", 'RuntimeError("jaxlib 0.1 is incompatible with jax 0.9")')
    _broken_package(tmp_path, "torch", 'OSError("libtorch_cpu.so: cannot open shared object")')
    out = run_script(
        """
        import json, warnings
        import mamba_core
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = mamba_core.MambaModule({"hidden_size": 8, "d_state": 4})
        errors = {}
        for name in ("jax", "torch"):
            try:
                mamba_core.MambaModule({"hidden_size": 8}, backend=name)
            except ImportError as exc:
                errors[name] = str(exc)
        print(json.dumps({"backend": m.backend_name, "errors": errors,
                          "warnings": [str(w.message) for w in caught]}))
        """,
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    assert out["backend"] == "numpy"
    assert any("'jax'" in w and "jaxlib 0.1 is incompatible" in w for w in out["warnings"])
    assert any("'torch'" in w and "libtorch_cpu.so" in w for w in out["warnings"])
    assert "installed but broken" in out["errors"]["jax"] and "RuntimeError" in out["errors"]["jax"]
    assert "installed but broken" in out["errors"]["torch"] and "OSError" in out["errors"]["torch"]


# ------------------------------------------------------------------ 7. one input normalisation
def test_every_float_numpy_accepts_is_accepted(backend, rng):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, dtype="float32")
    x = rng.standard_normal((1, 5, cfg.hidden_size))
    expected = to_np(module(x.astype(np.float32))["output"])
    for variant in (
        x.astype(">f4"),
        x.astype(">f8"),
        x.astype(np.longdouble),
        x.astype(np.float16),
    ):
        got = to_np(module(variant)["output"])
        tol = 5e-3 if variant.dtype == np.float16 else 1e-6
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


BAD_INPUTS = {
    "int": lambda x: x.astype(np.int64),
    "bool": lambda x: x > 0,
    "complex": lambda x: x.astype(np.complex64),
    "object": lambda x: x.astype(object),
    "str": lambda x: x.astype(str),
    "bytes": lambda x: x.astype(bytes),
    "datetime": lambda x: np.zeros(x.shape, dtype="datetime64[s]"),
    "structured": lambda x: np.zeros(x.shape, dtype=[("a", "f4"), ("b", "f4")]),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_other_dtypes_get_the_same_error_on_every_backend(kind, rng):
    cfg = small_config()
    bad = BAD_INPUTS[kind](rng.standard_normal((1, 3, cfg.hidden_size)))
    messages = set()
    for name in ("numpy", "jax", "torch"):
        require(name)
        with pytest.raises(TypeError, match="real floating dtype") as info:
            MambaModule(cfg, backend=name)(bad)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


def test_masked_arrays_are_refused(backend, rng):
    cfg = small_config()
    x = np.ma.masked_array(rng.standard_normal((1, 3, 16)), mask=np.zeros((1, 3, 16), bool))
    with pytest.raises(TypeError, match="MaskedArray"):
        MambaModule(cfg, backend=backend)(x)


# ------------------------------------------------------------------ 8. dtype=None
def test_dtype_none_means_float32(backend, tmp_path):
    cfg = small_config()
    module = MambaModule(cfg, backend=backend, dtype=None)
    assert module.dtype == "float32"
    module.save_pretrained(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    meta["dtype"] = None
    (tmp_path / "c" / "config.json").write_text(json.dumps(meta))
    assert MambaModule.from_pretrained(tmp_path / "c", backend=backend).dtype == "float32"


# ------------------------------------------------------------------ 9. corrupt checkpoints
def _corrupt_cases(directory: Path):
    import pickle
    import zipfile

    good = directory / "good"
    MambaModule(small_config(), backend="numpy").save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    meta = json.loads((good / "config.json").read_text())

    def make(name, weights_bytes=weights, config_text=None):
        d = directory / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(weights_bytes)
        (d / "config.json").write_text(config_text if config_text is not None else json.dumps(meta))
        return d

    zip_path = directory / "z.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    return {
        "pickle": (make("pickle", pickle.dumps({"in_proj.weight": [1.0]})), "looks like a pickle"),
        "zip": (make("zip", zip_path.read_bytes()), "looks like a zip archive"),
        "truncated": (make("truncated", weights[: len(weights) // 2]), "truncated"),
        "tiny": (make("tiny", b"\x01\x02"), "not a safetensors file"),
        "garbage": (
            make("garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx"),
            "corrupt safetensors header",
        ),
        "json": (make("json", config_text="{oops"), "config.json' is not valid JSON"),
        "version": (
            make("version", config_text=json.dumps({**meta, "format_version": 99})),
            "this release reads format versions 1, 2",
        ),
        "format": (
            make("format", config_text=json.dumps({**meta, "format": "other"})),
            "format='other'",
        ),
    }


def test_corrupt_checkpoints_get_errors_that_name_the_file(tmp_path):
    cases = _corrupt_cases(tmp_path)
    for name, (directory, match) in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            MambaModule.from_pretrained(directory, backend="numpy")
        assert str(directory) in str(info.value), name


def test_binary_config_json_names_the_file(tmp_path):
    d = tmp_path / "c"
    MambaModule(small_config(), backend="numpy").save_pretrained(d)
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"config.json' is not a UTF-8 JSON file"):
        MambaModule.from_pretrained(d, backend="numpy")


# ------------------------------------------------------------------ 10. the small holes
def test_small_holes(tmp_path):
    with pytest.raises(ValueError, match=r"dt_scale=1e\+40 is invalid.*overflow float32"):
        MambaConfig(dt_scale=1e40)
    with pytest.raises(ValueError, match=r"dt_max=1e\+39 is invalid.*overflow float32"):
        MambaConfig(dt_max=1e39)
    assert np.isfinite(
        init_params(small_config(dt_scale=1e30), 0)["dt_proj.weight"].astype(np.float32)
    ).all()
    with pytest.raises(TypeError, match="allow_fallback must be a bool"):
        MambaModule(small_config(), backend="numpy", allow_fallback="no")
    toml = tmp_path / "m.toml"
    toml.write_text("[modules.mamba]\nhidden_size = 16\n")
    with pytest.raises(TypeError, match="table must be a dotted table name"):
        MambaConfig.from_toml(toml, table=123)
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01hidden")
    with pytest.raises(ValueError, match=r"b.toml' is not a UTF-8 TOML file"):
        MambaConfig.from_toml(binary)
    broken = tmp_path / "c.toml"
    broken.write_text("[modules.mamba]\nhidden_size = 1\nhidden_size = 2\n")
    with pytest.raises(ValueError, match=r"c.toml' is not valid TOML"):
        MambaConfig.from_toml(broken)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        MambaModule(small_config(), backend="numpy", seed=-1)
    with pytest.raises(ValueError, match="expected a directory path"):
        MambaModule(small_config(), backend="numpy").save_pretrained("")


def test_jax_compile_metrics_are_per_call_across_threads(rng):
    require("jax")
    cfg = small_config(hidden_size=24)
    module = MambaModule(cfg, backend="jax")
    x = rng.standard_normal((1, 7, cfg.hidden_size))
    first = module(x)["metrics"]
    assert first["compiled_now"] is True
    results, barrier = {}, threading.Barrier(2)

    def cached():  # same shape: a cache hit
        barrier.wait()
        for i in range(20):
            results[f"cached{i}"] = module(x)["metrics"]["compiled_now"]

    def compiling():  # new shapes: compiles, concurrently
        barrier.wait()
        for length in range(8, 12):
            results[f"new{length}"] = module(rng.standard_normal((1, length, 24)))["metrics"][
                "compiled_now"
            ]

    threads = [threading.Thread(target=cached), threading.Thread(target=compiling)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v is False for k, v in results.items() if k.startswith("cached")), results
    assert all(v is True for k, v in results.items() if k.startswith("new")), results
