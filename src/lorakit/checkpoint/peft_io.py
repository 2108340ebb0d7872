"""Adapters on disk in PEFT's format: the one place PEFT's key names and config fields live.

A folder holds `adapter_model.safetensors` and `adapter_config.json`. Keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (`.lora_embedding_A` /
`.lora_embedding_B` for embeddings) and a variant's own tensors (named by its class's `PEFT_KEYS`),
`base_model.model.<path>.<param>` for modules saved in full, and the trained biases under their
own names. Only safetensors is read: a pickled `.bin` runs code
when loaded, so it is refused unless the caller says it trusts the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import ConfigError, LoraConfig
from lorakit.lora.adapters import adapter_config, in_saved_module, lora_layers, remove_adapter_parts, saved_modules
from lorakit.lora.inject import inject
from lorakit.lora.inits import MOVES_BASE
from lorakit.lora.variants import VARIANTS

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# PEFT options whose adapters our LoRA would compute differently: refused rather than mis-loaded,
# unless a variant (lora/variants) answers for the flag, which LoraConfig then carries.
PEFT_FLAGS = ("use_dora", "lora_bias", "layers_to_transform", "target_parameters", "use_qalora", "exclude_modules",
              "alora_invocation_tokens")
# PEFT inits that move part of W into the adapter: PEFT saves such factors relative to the reduced base, unless
# saved with path_initial_model_for_weight_conversion (which writes init_lora_weights: true, as lorakit does)
BASE_MOVING_INITS = ("pissa", "olora", "corda")


# An adapter parameter's name in lorakit -> its key suffix in a PEFT file (for linear and conv1d
# layers; embeddings keep A and B as lora_embedding_A / lora_embedding_B, bare parameters). A
# variant's own tensors are named by its class (`PEFT_KEYS`), beside its math.
PEFT_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight"}


def peft_key(kind: str, param: str, adapter: nn.Module) -> str:
    if kind == "embedding" and param in ("A", "B"):
        return f"lora_embedding_{param}"
    return PEFT_KEYS.get(param) or type(adapter).PEFT_KEYS[param]


class AdapterError(ValueError):
    """An adapter folder cannot be read, written, or does not fit the model."""


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The live tensors of adapter `name`, keyed by their PEFT names."""
    config = adapter_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        for param_name, param in adapter.named_parameters(recurse=False):
            out[f"{PREFIX}{path}.{peft_key(layer.kind, param_name, adapter)}"] = param
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{PREFIX}{path}.base_layer.bias"] = layer.base_layer.bias
    for path, wrapper in saved_modules(model):
        if name in wrapper.copies:
            for key, tensor in wrapper.copies[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    if config.bias == "all":
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") and not in_saved_module(param_name):
                out.setdefault(f"{PREFIX}{param_name}", param)
    return out


def peft_config_dict(model: nn.Module, name: str) -> dict:
    """adapter_config.json's fields for adapter `name`, as PEFT writes them."""
    config = adapter_config(model, name)
    fields = asdict(config)
    fields["target_modules"] = (
        config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    )
    fields["init_lora_weights"] = True  # the saved tensors are what counts; PEFT must not re-initialise
    del fields["loftq_iter"]  # PEFT keeps LoftQ settings in loftq_config, used only to initialise
    del fields["dora_dropout"]  # a training setting PEFT has no field for; the tensors are PEFT's DoRA either way
    return {
        "peft_type": "LORA",
        "use_dora": False,  # PEFT's flags, unless the config carries them (a variant's flag)
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        **fields,
        "fan_in_fan_out": any(layer.kind == "conv1d" for _, layer in lora_layers(model) if name in layer.adapters),
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT adapter folder; each file lands whole or not at all.

    Raises:
        AdapterError: the adapter holds no LoRA tensors, or a classifier's head would not be saved.
    """
    directory = Path(directory)
    live = adapter_tensors(model, name)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in live.items()}
    config = peft_config_dict(model, name)
    _check_before_save(model, name, tensors)
    if adapter_config(model, name).init_lora_weights in MOVES_BASE:
        tensors, config = _as_lora_on_original_base(model, name, tensors, config)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    # the fields sorted, but rank_pattern and alpha_pattern in their own order: their first matching key wins
    text = json.dumps(dict(sorted(config.items())), indent=2) + "\n"
    _write_atomic(directory / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


def _check_before_save(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if not any(".lora_" in k for k in tensors):
        raise AdapterError(f"adapter '{name}' has no LoRA tensors to save; was inject() called on this model?")
    # A fresh adapter's update is zero through B (through A for embeddings, as PEFT initialises them).
    updates = [v for k, v in tensors.items() if k.endswith(("lora_B.weight", "lora_embedding_A"))]
    if adapter_config(model, name).init_lora_weights in (True, "gaussian") and not any(t.any() for t in updates):
        log.warning("adapter '%s': its update is still zero, so it changes nothing (was it trained?)", name)
    if type(model).__name__.endswith("ForSequenceClassification") and not any(
        name in w.copies for _, w in saved_modules(model)
    ):
        raise AdapterError(
            f"adapter '{name}' is for a {type(model).__name__} but its classifier head is not saved; "
            "set lora.modules_to_save (e.g. ['classifier']) or lora.task_type: SEQ_CLS"
        )


def _as_lora_on_original_base(model, name, tensors, config):
    """Re-express a PiSSA/OLoRA adapter relative to the original W, so it loads on an unmodified base.

    The base now holds W - s B0 A0; with trained A, B the model computes W + s (B A - B0 A0), which
    is a plain LoRA of rank 2r: A' = [A; A0], B' = [B, -B0], same scale s. (A DoRA adapter's weight
    W - s B0 A0 + s B A is the same matrix, so its magnitude carries over unchanged.) A layer the init left alone
    (an embedding) gets zero ranks, A' = [A; 0], B' = [B, 0]: every layer has the rank 2r the config then says.
    """
    for path, layer in lora_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            continue
        a_key, b_key = (f"{PREFIX}{path}.{peft_key(layer.kind, p, adapter)}" for p in ("A", "B"))
        A0, B0 = (adapter.A0.cpu(), adapter.B0.cpu()) if hasattr(adapter, "A0") else map(torch.zeros_like, (
            tensors[a_key], tensors[b_key]))
        tensors[a_key], tensors[b_key] = torch.cat([tensors[a_key], A0]), torch.cat([tensors[b_key], -B0], dim=1)
    grow = math.sqrt(2) if config["use_rslora"] else 2.0  # keeps alpha / r (or / sqrt r) unchanged
    config = {
        **config,
        "r": 2 * config["r"],
        "lora_alpha": config["lora_alpha"] * grow,
        "rank_pattern": {k: 2 * v for k, v in config["rank_pattern"].items()},
        "alpha_pattern": {k: v * grow for k, v in config["alpha_pattern"].items()},
    }
    return tensors, config


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except SafetensorError as err:  # a full disk or a write error inside safetensors' own writer
        raise AdapterError(f"{path}: could not be written ({err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_json_object(path: Path, expected: str) -> dict:
    """The JSON object in `path`; AdapterError naming the file where it is not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err}); expected {expected}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: holds a JSON {type(data).__name__}; expected {expected}")
    return data


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a PEFT adapter folder, whoever wrote it."""
    path = Path(directory) / CONFIG_NAME
    if Path(directory).is_file():
        raise AdapterError(f"{directory}: is a file; expected an adapter folder holding {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}")
    if not path.is_file():
        raise AdapterError(f"{path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = read_json_object(path, "an object of LoRA settings")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {data.get('peft_type')!r}; lorakit reads LORA adapters")
    for key in PEFT_FLAGS:
        if key not in VARIANTS and data.get(key) not in (None, False, [], {}):
            raise AdapterError(f"{path}: '{key}' is set ({data[key]!r}); lorakit does not support it")
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MOVING_INITS):
        raise AdapterError(f"{path}: init_lora_weights is {init!r}: these factors were saved relative to the base "
                           f"{init} reduced, not to the base itself; save them with PEFT's "
                           "path_initial_model_for_weight_conversion (or train with lorakit) for an adapter of the "
                           "base itself")
    known = {k: v for k, v in data.items() if k in LoraConfig.field_names() and v is not None}
    known.setdefault("target_modules", None)
    known["init_lora_weights"] = True  # loading overwrites A and B; never re-run PiSSA on load
    try:
        return LoraConfig(**known)
    except (ConfigError, TypeError) as err:
        raise AdapterError(f"{path}: {err}") from None


def read_adapter_weights(directory: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder. Safetensors only, unless `trust_pickle` is given."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterError(f"{path}: {_unreadable(path, err)}") from None
    pickled = [directory / n for n in PICKLE_NAMES if (directory / n).is_file()]
    if pickled and not trust_pickle:
        raise AdapterError(
            f"{pickled[0]}: refusing a pickled adapter (loading pickle can run code); convert it to "
            f"{WEIGHTS_NAME}, or pass trust_pickle=True if you trust its source"
        )
    if pickled:
        return torch.load(pickled[0], map_location="cpu", weights_only=True)
    raise AdapterError(f"{path}: not found")


def _unreadable(path: Path, err: Exception) -> str:
    """Why a safetensors file did not load, in words: a pickle in disguise, truncated, or damaged."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = os.fstat(fh.fileno()).st_size
        if head.startswith((b"\x80", b"PK\x03\x04")):  # a pickle stream, or torch.save's zip of one
            return (
                "is a pickle (torch.save) file, not safetensors; refused, since loading pickle can run code; "
                "expected a safetensors file (convert it with safetensors.torch.save_file)"
            )
        needed = 8 + int.from_bytes(head, "little") if len(head) == 8 else 8
        if needed <= size:
            try:
                header = json.loads(fh.read(needed - 8))
                needed += max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError):
                pass
    if needed > size:
        return f"is truncated ({size} bytes, its header needs {needed}); expected a complete safetensors file"
    return f"not a readable safetensors file ({err})"


@torch.no_grad()
def load_adapter(
    model: nn.Module, directory: str | Path, name: str = "default", trust_pickle: bool = False,
    lora_only: bool = False,
) -> LoraConfig:
    """Add the adapter in `directory` (written by lorakit or PEFT) to `model` as `name`.

    Every LoRA tensor the model expects must be in the file with the same shape, every tensor in the file must
    have a place in the model, every value must be finite, and the config's ranks must be those the tensors
    hold; otherwise nothing is loaded (nothing of the adapter is left in the model) and the first problem is
    named. `lora_only` also refuses tensors that would overwrite the base model's own weights (biases,
    modules_to_save): a server shares its base between adapters.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_adapter_weights(directory, trust_pickle)
    _check_values(tensors, directory)
    _check_ranks(config, tensors, directory)
    _check_scale(config, tensors, directory)
    if lora_only and (config.modules_to_save or config.task_type == "SEQ_CLS"):  # refused before anything is wrapped
        raise AdapterError(f"{directory / CONFIG_NAME}: the adapter trains whole modules too (modules_to_save, or a "
                           "SEQ_CLS head); a server shares its base model between adapters and loads LoRA factors only")
    made_for = f" (the adapter was trained on {config.base_model_name_or_path})" if config.base_model_name_or_path else ""
    try:
        try:
            inject(model, config, name)
        except ConfigError as err:
            raise AdapterError(f"{directory}: does not fit this {type(model).__name__}{made_for}: {err}") from None
        try:
            if lora_only:
                _check_lora_only(model, name, tensors, directory)
            _copy_into(model, name, tensors, directory)
        except AdapterError as err:
            raise AdapterError(f"{err}{made_for}") from None
    except BaseException:
        remove_adapter_parts(model, name)  # whatever failed, and wherever inject stopped: no part of it stays
        raise
    if not model.training:  # the new layers (and their dropout) follow a model in eval mode, as PEFT's loading does
        model.eval()
    return adapter_config(model, name)


def _check_values(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Every floating-point value finite: a NaN or an infinity would make every output of the adapter NaN."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(
                f"{directory / WEIGHTS_NAME}: {key} holds NaN or infinite values; expected finite weights")


def _check_scale(config: LoraConfig, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """The update s B A x stays within float32 for inputs x of entries up to 1: finite factors under a scaling so large
    that s max|B| max|A| r in_features overflows would make the adapter's outputs NaN."""
    alphas = [config.lora_alpha, *config.alpha_pattern.values()]
    ranks = [config.r, *config.rank_pattern.values()]
    scale = max(alphas) / (math.sqrt(min(ranks)) if config.use_rslora else min(ranks))
    a, b = (max((float(t.abs().max()) for k, t in tensors.items() if side in k and t.numel()), default=0.0)
            for side in (".lora_A.", ".lora_B."))
    width = max((t.shape[-1] for k, t in tensors.items() if ".lora_A." in k and t.dim() == 2), default=0)
    if not scale * a * b * max(ranks) * width <= torch.finfo(torch.float32).max:
        raise AdapterError(f"{directory / CONFIG_NAME}: lora_alpha / r = {scale:.3g} times the factors puts the "
                           "update beyond float32's range; expected a scaling its outputs can hold")


def _check_ranks(config: LoraConfig, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """No module's rank from r and rank_pattern exceeds what its lora_A holds, checked before the adapter is made (a
    wrong r would allocate first). An r no module uses (all are in rank_pattern) loads, as in PEFT."""
    for key, t in tensors.items():
        if ".lora_A." not in key or t.dim() < 1:
            continue
        asked = config.rank_and_alpha(key.split(".lora_A.")[0].removeprefix(PREFIX))[0]
        if asked > t.shape[0]:
            raise AdapterError(f"{directory / CONFIG_NAME}: r (or rank_pattern) asks for rank {asked} on "
                               f"{key.split('.lora_A.')[0]}, but its weights hold rank {t.shape[0]}")


def _check_lora_only(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    own = {f"{PREFIX}{path}.{peft_key(layer.kind, param_name, layer.adapters[name])}"
           for path, layer in lora_layers(model) if name in layer.adapters
           for param_name, _ in layer.adapters[name].named_parameters(recurse=False)}
    other = next((key for key in tensors if key not in own), None)
    if other is not None:
        raise AdapterError(f"{directory / WEIGHTS_NAME}: {other} is not a LoRA weight; a server shares its base model "
                           "between adapters and loads LoRA factors only")




@torch.no_grad()
def restore_adapter_weights(model: nn.Module, name: str, directory: str | Path) -> None:
    """Overwrite the tensors of an existing adapter `name` with those saved in `directory`.

    A PiSSA/OLoRA adapter is saved re-expressed against the original W (rank 2r, see
    `_as_lora_on_original_base`); restoring it into the live adapter takes back the trained halves.
    """
    tensors = read_adapter_weights(directory)
    _copy_into(model, name, _on_moved_base(model, name, tensors, Path(directory)), Path(directory))


def _on_moved_base(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: Path) -> dict:
    """Undo `_as_lora_on_original_base` for the layers whose adapter moved part of W: A = A'[:r], B = B'[:, :r]."""
    tensors = dict(tensors)
    for path, layer in lora_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        a_key, b_key = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        if adapter is None or not hasattr(adapter, "A0") or a_key not in tensors or b_key not in tensors:
            continue
        A, B, r = tensors[a_key], tensors[b_key], adapter.r
        if A.shape[0] != 2 * r or B.shape[1] != 2 * r:
            continue  # saved as the live tensors: copied as they are
        start = (adapter.B0 @ adapter.A0).cpu()  # the part of W the adapter took at its start
        if not torch.allclose(-B[:, r:].float() @ A[r:].float(), start.float(), rtol=1e-3, atol=1e-5):
            raise AdapterError(
                f"{directory}: {a_key} holds another PiSSA/OLoRA start than this adapter's; it comes from another run"
            )
        tensors[a_key], tensors[b_key] = A[:r], B[:, :r]
    return tensors


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = adapter_tensors(model, name)
    base_params = {f"{PREFIX}{k}": v for k, v in model.named_parameters()}
    missing = [k for k in expected if k not in tensors and ".lora_" in k]
    if missing:
        raise AdapterError(f"{directory}: the model expects {missing[0]} but the adapter file lacks it")
    plan = []
    for key, value in tensors.items():
        target = expected.get(key, base_params.get(key))
        if target is None:
            raise AdapterError(f"{directory}: {key} has no place in this {type(model).__name__}")
        if tuple(target.shape) != tuple(value.shape):
            raise AdapterError(
                f"{directory}: {key} has shape {tuple(value.shape)} but the model needs {tuple(target.shape)}"
            )
        plan.append((target, value))
    for target, value in plan:
        target.copy_(value.to(target.dtype))
