"""Blocks, language models, real checkpoints (HF and official layouts), generation, PyTorch
hosts (`replace_mixers`), masks and the modular-framework drop-in."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from mamba_core import MambaConfig, MambaModule, create_module
from mamba_core.io import CheckpointError
from mamba_core.lm import MambaBlock, MambaLM, sample_next
from mamba_core.models import LMConfig, init_lm_params
from tests.conftest import BACKENDS, require
from tests.reference import reference_lm
from tests.tolerances import assert_close, to_np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["mamba", "mamba2"]


def _hf_model(kind: str, tie: bool = True, seed: int = 0):
    require("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(seed)
    if kind == "mamba":
        cfg = transformers.MambaConfig(
            vocab_size=100, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
            conv_kernel=4, time_step_rank=8, tie_word_embeddings=tie,
        )  # fmt: skip
        return transformers.MambaForCausalLM(cfg).eval()
    cfg = transformers.Mamba2Config(
        vocab_size=100, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
        conv_kernel=4, num_heads=8, head_dim=16, n_groups=2, chunk_size=16,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=KINDS)
def hf_checkpoint(request, tmp_path_factory):
    """(kind, HF model, its saved directory, prompt ids, HF logits, HF greedy 32 tokens)."""
    import torch

    model = _hf_model(request.param, tie=request.param == "mamba")
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 100, (2, 9)))
    model.generation_config.eos_token_id = None  # 32 tokens exactly, as ours without eos
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
            pad_token_id=0,
        ).numpy()  # fmt: skip
    return request.param, model, directory, ids.numpy(), logits, greedy


# ------------------------------------------------------------------ real checkpoints
def test_hf_checkpoint_logits_and_greedy_generation(backend, hf_checkpoint):
    kind, _, directory, ids, logits, greedy = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend=backend)
    assert lm.config.mixer.version == {"mamba": "mamba1", "mamba2": "mamba2"}[kind]
    ours, states = lm(ids)
    assert_close(ours, logits, "float32", factor=5)
    assert len(states) == 2
    np.testing.assert_array_equal(lm.generate(ids, 32), greedy)


def test_float64_model_matches_the_independent_reference(backend, hf_checkpoint):
    _, model, directory, ids, _, _ = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend=backend, dtype="float64")
    params = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    expected = reference_lm(params, ids, lm.config)
    assert_close(lm(ids)[0], expected, "float64")


def test_decode_steps_equal_the_forward(backend, hf_checkpoint):
    _, _, directory, ids, _, _ = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend=backend, dtype="float64")
    full, _ = lm(ids)
    _, states = lm(ids[:, :4])
    for t in range(4, ids.shape[1]):
        step_logits, states = lm.step(ids[:, t], states)
        assert_close(step_logits, to_np(full)[:, t], "float64")


def test_left_padded_batches_equal_one_by_one(backend, hf_checkpoint):
    _, _, directory, _, _, _ = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend=backend)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 100, n) for n in (3, 7, 5)]
    width = max(len(p) for p in prompts)
    batch = np.zeros((3, width), dtype=np.int64)
    mask = np.zeros((3, width), dtype=np.int64)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    together = lm.generate(batch, 12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = lm.generate(p[None, :], 12)
        np.testing.assert_array_equal(together[i, width:], alone[0, len(p) :])


def test_sampling_is_reproducible_per_seed_on_every_backend(hf_checkpoint):
    _, _, directory, ids, _, _ = hf_checkpoint
    runs = {}
    for name in BACKENDS:
        require(name)
        lm = MambaLM.from_pretrained(directory, backend=name)
        opts = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
        runs[name] = lm.generate(ids, 16, seed=7, **opts)
        np.testing.assert_array_equal(lm.generate(ids, 16, seed=7, **opts), runs[name])
        assert not np.array_equal(lm.generate(ids, 16, seed=8, **opts), runs[name])
    for name in runs:
        np.testing.assert_array_equal(runs[name], runs["numpy"])


def test_streaming_and_eos(hf_checkpoint):
    _, _, directory, ids, _, greedy = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend="numpy")
    streamed = np.stack(list(lm.generate(ids, 32, stream=True)), axis=1)
    np.testing.assert_array_equal(streamed, greedy[:, ids.shape[1] :])
    eos = int(greedy[0, ids.shape[1] + 2])
    out = lm.generate(ids[:1], 32, eos_token_id=eos)
    assert out[0, -1] == eos and out.shape[1] <= ids.shape[1] + 3


def test_official_layout_loads(tmp_path, hf_checkpoint):
    """The official mamba_ssm layout: d_model / n_layer / ssm_cfg, `backbone.embedding`,
    a stored tied head, a vocabulary padded to pad_vocab_size_multiple."""
    from safetensors.numpy import save_file

    kind, model, _, ids, logits, _ = hf_checkpoint
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    tie = "lm_head.weight" not in sd or kind == "mamba"
    sd.setdefault("lm_head.weight", sd["backbone.embedding.weight"])
    c = model.config
    ssm = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand}
    if kind == "mamba":
        ssm.update(layer="Mamba1", dt_rank=c.time_step_rank)
    else:
        ssm.update(layer="Mamba2", headdim=c.head_dim, ngroups=c.n_groups)
    official = {
        "d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": 97,
        "pad_vocab_size_multiple": 4, "ssm_cfg": ssm, "rms_norm": True,
        "residual_in_fp32": True, "tie_embeddings": tie,
    }  # fmt: skip
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(official))
    lm = MambaLM.from_pretrained(tmp_path, backend="numpy")
    assert lm.config.vocab_size == 100
    assert_close(lm(ids)[0], logits, "float32", factor=5)


def test_round_trip_through_transformers(tmp_path, hf_checkpoint):
    import torch
    import transformers

    kind, _, directory, ids, logits, _ = hf_checkpoint
    lm = MambaLM.from_pretrained(directory, backend="numpy")
    lm.save_pretrained(tmp_path / "ours")
    cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.Mamba2ForCausalLM
    back = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(torch.from_numpy(ids)).logits, logits, "float32", factor=5)
    back.save_pretrained(tmp_path / "again")
    again = MambaLM.from_pretrained(tmp_path / "again", backend="numpy")
    for k, v in lm.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v)


LM_VERSIONS = {
    "mamba": dict(hidden_size=32, d_state=8, dt_rank=4),
    "mamba2": dict(version="mamba2", hidden_size=32, d_state=8, head_dim=16, n_groups=2),
    "mamba3": dict(version="mamba3", hidden_size=32, d_state=8, head_dim=16),
    "mamba3-mimo": dict(
        version="mamba3", hidden_size=32, d_state=8, head_dim=16, mimo=True, mimo_rank=2,
        outproj_norm=True, rope_fraction=1.0, A_floor=1e-3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(LM_VERSIONS))
def test_every_version_saves_and_loads_back(tmp_path, kind, rng):
    """save_pretrained -> from_pretrained gives the same config, weights and logits for every
    mixer version; a Mamba-3 config.json says model_type "mamba3" (transformers has no
    Mamba-3 class, so none is claimed) instead of passing for a Mamba-1 model."""
    config = LMConfig(mixer=MambaConfig(**LM_VERSIONS[kind]), n_layer=2, vocab_size=50)
    lm = MambaLM(config, backend="numpy", dtype="float64", seed=3)
    lm.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == kind.split("-")[0]
    assert ("architectures" in written) == (kind in ("mamba", "mamba2"))
    back = MambaLM.from_pretrained(tmp_path, backend="numpy", dtype="float64")
    assert back.config == config
    for k, v in lm.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    ids = rng.integers(0, 50, (2, 7))
    np.testing.assert_array_equal(back(ids)[0], lm(ids)[0])
    full, _ = back(ids)
    _, states = back(ids[:, :4])
    for t in range(4, 7):  # the reloaded model decodes: each step equals the forward
        logits, states = back.step(ids[:, t], states)
        assert_close(logits, full[:, t], "float64")
    for host in ("torch", "jax"):  # the framework LMs write the same files
        require(host)
        if host == "torch":
            from mamba_core.backends.torch import MambaLMTorch as cls
        else:
            from mamba_core.backends.flax import MambaLMFlax as cls
        cls.from_pretrained(tmp_path).save_pretrained(tmp_path / host)
        again = MambaLM.from_pretrained(tmp_path / host, backend="numpy", dtype="float64")
        assert again.config == config
        for k, v in lm.state_dict().items():  # float32 weights written as float32
            np.testing.assert_array_equal(again.state_dict()[k], v.astype(np.float32))
    written["model_type"] = "mamba4"
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(CheckpointError, match=r"model_type='mamba4' is not a Mamba language "
                       r"model \(expected one of 'mamba', 'mamba2', 'mamba3'\)"):  # fmt: skip
        MambaLM.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path, hf_checkpoint):
    _, model, _, ids, logits, _ = hf_checkpoint
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    lm = MambaLM.from_pretrained(tmp_path, backend="numpy")
    assert_close(lm(ids)[0], logits, "float32", factor=5)


# ------------------------------------------------------------------ bad checkpoints
def test_bad_checkpoints_get_errors_naming_file_and_tensor(tmp_path, hf_checkpoint):
    from safetensors.numpy import load_file, save_file

    _, _, directory, _, _, _ = hf_checkpoint
    good = load_file(Path(directory) / "model.safetensors")
    config = (Path(directory) / "config.json").read_text()

    def make(name, tensors=None, raw=None, cfg=config):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        elif tensors is not None:
            save_file(tensors, d / "model.safetensors")
        return d

    missing = dict(good)
    del missing["backbone.norm_f.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['backbone.norm_f.weight'\]"):
        MambaLM.from_pretrained(make("missing", missing), backend="numpy")
    shaped = {**good, "backbone.norm_f.weight": np.ones(3, np.float32)}
    with pytest.raises(
        ValueError, match=r"backbone.norm_f.weight: expected shape \(64,\), received \(3,\)"
    ):
        MambaLM.from_pretrained(make("shape", shaped), backend="numpy")
    import pickle

    with pytest.raises(ValueError, match="looks like a pickle"):
        MambaLM.from_pretrained(make("pickle", raw=pickle.dumps(good)), backend="numpy")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(config)
    (legacy / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match=r"never loaded here.*save_file.*weights_only=True"):
        MambaLM.from_pretrained(legacy, backend="numpy")
    with pytest.raises(ValueError, match="model_type='llama' is not a Mamba"):
        MambaLM.from_pretrained(make("llama", good, cfg=json.dumps({"model_type": "llama"})))


def test_a_config_claiming_huge_sizes_is_refused_before_allocating(tmp_path, hf_checkpoint):
    _, _, directory, _, _, _ = hf_checkpoint
    big = json.loads((Path(directory) / "config.json").read_text())
    big.update(hidden_size=8192, vocab_size=256000)
    if "num_heads" in big:  # Mamba-2: a consistent head count for the claimed width
        big["num_heads"] = 2 * 8192 // big["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(big))
    (tmp_path / "model.safetensors").write_bytes(
        (Path(directory) / "model.safetensors").read_bytes()
    )
    code = f"""
import json, resource
from mamba_core.lm import MambaLM
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    MambaLM.from_pretrained({str(tmp_path)!r}, backend="numpy"); message = None
except ValueError as exc:
    message = str(exc)
print(json.dumps({{"message": message,
                  "grown": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        out["message"]
        and "backbone.embeddings.weight: expected shape (256000, 8192)" in out["message"]
    )
    assert out["grown"] < 64 * 1024  # KiB; the claimed model is tens of GB


# ------------------------------------------------------------------ PyTorch and Flax models
def test_torch_lm_loads_hf_state_dicts_strictly(hf_checkpoint):
    import torch

    from mamba_core.backends.torch import MambaLMTorch

    _, model, directory, ids, logits, greedy = hf_checkpoint
    lm = MambaLMTorch(MambaLM.from_pretrained(directory, backend="numpy").config, seed=0)
    lm.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(lm(torch.from_numpy(ids)), logits, "float32", factor=5)
    np.testing.assert_array_equal(lm.generate(ids, 32), greedy)
    loaded = MambaLMTorch.from_pretrained(directory)
    (loaded(torch.from_numpy(ids)) ** 2).mean().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_flax_lm_matches(hf_checkpoint):
    require("flax")
    from mamba_core.backends.flax import MambaLMFlax

    _, _, directory, ids, logits, greedy = hf_checkpoint
    lm = MambaLMFlax.from_pretrained(directory)
    assert "backbone.layers.1.mixer.in_proj.weight" in lm.params_dict()
    assert_close(lm(ids), logits, "float32", factor=5)
    np.testing.assert_array_equal(lm.generate(ids, 32), greedy)


def test_replace_mixers_keeps_logits_gradients_and_generate(hf_checkpoint):
    import torch

    from mamba_core.backends.torch import HFMixerAdapter, replace_mixers

    kind, _, _, ids, logits, greedy = hf_checkpoint
    host = _hf_model(kind, tie=kind == "mamba")  # the same seed: the same weights
    reference = _hf_model(kind, tie=kind == "mamba")
    assert replace_mixers(host) == 2
    assert isinstance(host.backbone.layers[0].mixer, HFMixerAdapter)
    tids = torch.from_numpy(ids)
    with torch.no_grad():
        assert_close(host(tids).logits, logits, "float32", factor=5)
        host.generation_config.eos_token_id = None
        out = host.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=32,
                            do_sample=False, pad_token_id=0)  # fmt: skip
    np.testing.assert_array_equal(out.numpy(), greedy)
    host.train()
    reference.train()
    host(tids).logits.square().mean().backward()
    reference(tids).logits.square().mean().backward()
    ours, theirs = dict(host.named_parameters()), dict(reference.named_parameters())
    assert set(ours) == set(theirs)
    for name, p in ours.items():
        assert_close(p.grad, theirs[name].grad, "float32", factor=50)


# ------------------------------------------------------------------ blocks and masks
VERSIONS = {
    "mamba1": dict(hidden_size=16, d_state=8, dt_rank=4, chunk_size=8),
    "mamba2": dict(version="mamba2", hidden_size=16, d_state=8, head_dim=8, chunk_size=8),
    "mamba3": dict(version="mamba3", hidden_size=16, d_state=8, head_dim=8, chunk_size=8),
}


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_masks_left_and_right_padding_equal_the_unpadded_run(backend, version, rng):
    cfg = MambaConfig(**VERSIONS[version])
    module = MambaModule(cfg, backend=backend, dtype="float64", seed=2)
    x = rng.standard_normal((1, 6, 16))
    plain = module(x)
    pad = rng.standard_normal((1, 3, 16)) * 10  # garbage that must not leak
    left = module(np.concatenate([pad, x], axis=1), attention_mask=[[0, 0, 0] + [1] * 6])
    assert_close(to_np(left["output"])[:, 3:], plain["output"], "float64")
    assert_close(left["state"].ssm_state, plain["state"].ssm_state, "float64")
    right = module(np.concatenate([x, pad], axis=1), attention_mask=[[1] * 6 + [0, 0, 0]])
    assert_close(to_np(right["output"])[:, :6], plain["output"], "float64")
    assert_close(right["state"].ssm_state, plain["state"].ssm_state, "float64")
    with pytest.raises(ValueError, match=r"attention_mask of shape \(batch, seq_len\) = \(1, 6\)"):
        module(x, attention_mask=np.ones((1, 5)))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1 \\(real token\\)"):
        module(x, attention_mask=np.full((1, 6), 2))


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_blocks_on_every_backend_and_module(backend, version, rng):
    cfg = MambaConfig(**VERSIONS[version])
    block = MambaBlock(cfg, backend=backend, dtype="float64", seed=1)
    x = rng.standard_normal((2, 5, 16))
    mixer = MambaModule(cfg, backend="numpy", dtype="float64", seed=1)
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5)
    expected = x + to_np(mixer(normed)["output"])
    result = block(x)
    assert_close(result["output"], expected, "float64")
    assert result["processing_info"]["module_type"] == "MambaBlock"
    assert set(block.state_dict()) == {"norm.weight", *(f"mixer.{k}" for k in mixer.state_dict())}
    masked = block(x, np.ones((2, 5)))
    assert_close(masked["output"], expected, "float64")


def test_torch_and_flax_blocks_take_the_host_mask(rng):
    require("torch")
    require("flax")
    import jax.numpy as jnp
    import torch

    from mamba_core.backends.flax import MambaBlockFlax
    from mamba_core.backends.torch import MambaBlockTorch

    cfg = MambaConfig(**VERSIONS["mamba1"])
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    mask = np.ones((2, 5), np.float32)
    expected = to_np(MambaBlock(cfg, backend="numpy", seed=4)(x)["output"])
    tblock = MambaBlockTorch(cfg, seed=4)
    assert {n for n, _ in tblock.named_parameters()} >= {"norm.weight", "mixer.in_proj.weight"}
    with torch.no_grad():
        assert_close(
            tblock(torch.from_numpy(x), torch.from_numpy(mask)), expected, "float32", factor=5
        )
    fblock = MambaBlockFlax(cfg, seed=4)
    assert_close(fblock(jnp.asarray(x), jnp.asarray(mask)), expected, "float32", factor=5)


# ------------------------------------------------------------------ the generate CLI
def test_cli_generates_text_with_a_trained_tokenizer(tmp_path):
    require("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["[UNK]"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    vocab = tok.get_vocab_size()
    lm = MambaLM(
        LMConfig(mixer=MambaConfig(**VERSIONS["mamba1"]), vocab_size=vocab), backend="numpy"
    )
    lm.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    proc = subprocess.run(
        [sys.executable, "-m", "mamba_core", "generate", "--model", str(tmp_path), "--prompt",
         "the quick", "--backend", "numpy", "--max-new-tokens", "8"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the quick")
    assert "prefill: 2 tokens" in proc.stderr and "decode: 8 tokens" in proc.stderr
    ids = np.asarray([tok.encode("the quick").ids])
    expected = tok.decode(lm.generate(ids, 8)[0].tolist())
    assert proc.stdout.split() == expected.split()
    (tmp_path / "tokenizer.json").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "mamba_core", "generate", "--model", str(tmp_path), "--prompt",
         "1 2 3", "--backend", "numpy", "--max-new-tokens", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["1", "2", "3"] and len(proc.stdout.split()) == 7


# ------------------------------------------------------------------ the drop-in
def test_modular_framework_drop_in(tmp_path):
    module = MambaModule(hidden_size=32, d_state=8, backend="numpy")
    assert module.config.hidden_size == 32
    module = MambaModule({"hidden_size": 32}, backend="numpy", d_state=4)
    assert module.config.d_state == 4
    built = create_module("mamba", hidden_size=32, d_state=8)
    out = built(np.zeros((1, 3, 32)))
    assert "memory_efficiency" in out["processing_info"]
    shared = {"hidden_size": 32, "mamba_threshold": 512, "num_heads_attn": 12}
    with pytest.raises(ValueError, match="'mamba_threshold' is not a MambaConfig field"):
        MambaConfig.from_dict(shared)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = MambaConfig.from_dict(shared, strict=False)
    assert cfg.hidden_size == 32
    assert len(caught) == 1 and "['mamba_threshold', 'num_heads_attn']" in str(caught[0].message)
    toml = tmp_path / "h.toml"
    toml.write_text("[modules.mamba]\nenabled = true\nhidden_size = 32\nmamba_threshold = 512\n")
    with pytest.warns(UserWarning, match="mamba_threshold"):
        assert MambaConfig.from_toml(toml, strict=False).hidden_size == 32


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert sample_next(logits, None)[0] == 0
    draws = [sample_next(logits, rng, do_sample=True, top_k=2)[0] for _ in range(200)]
    assert set(draws) == {0, 1}
    draws = [sample_next(logits, rng, do_sample=True, top_p=0.5)[0] for _ in range(50)]
    assert set(draws) == {0}
    draws = [sample_next(logits, rng, do_sample=True, top_p=0.85)[0] for _ in range(300)]
    assert set(draws) == {0, 1, 2}


def test_lm_input_errors():
    lm = MambaLM(LMConfig(mixer=MambaConfig(**VERSIONS["mamba1"]), vocab_size=10), backend="numpy")
    with pytest.raises(ValueError, match=r"token ids in \[0, 10\)"):
        lm(np.array([[1, 12]]))
    with pytest.raises(TypeError, match="integer dtype"):
        lm(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="2-D array"):
        lm(np.array([1, 2]))
    with pytest.raises(ValueError, match="list of 2 per-layer states"):
        lm.step(np.array([1]), [])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        lm.generate(np.array([[1]]), -1)
    assert init_lm_params(lm.config, 0)["backbone.embeddings.weight"].shape == (10, 16)
