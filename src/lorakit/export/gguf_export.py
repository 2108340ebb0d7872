"""The `gguf` and `gguf-lora` formats: load the base (and adapter), then write the file(s)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lorakit.export.errors import ExportError
from lorakit.export.formats import ExportConfig, ExportResult, register_format
from lorakit.export.gguf_file import PromptInfo, check_exportable, write_model_gguf
from lorakit.export.output import check_writable, write_text_atomic

logger = logging.getLogger(__name__)


@register_format("gguf")
def export_model(config: ExportConfig) -> ExportResult:
    """Merge the adapter (if any) into the base and write one GGUF file (plus a Modelfile with --ollama)."""

    from lorakit import load_adapter, merge_and_unload
    from lorakit.export.ollama import modelfile_path

    path = config.output_path()
    check_writable(path, config.force, config.inputs())
    if config.ollama:
        if modelfile_path(path).resolve() == path.resolve():
            raise ExportError(f"{path}: is where --ollama writes the Modelfile; name the GGUF file otherwise "
                              "(e.g. model.gguf)")
        check_writable(modelfile_path(path), config.force, config.inputs())
    from lorakit.models import load_causal_lm, load_config, load_tokenizer

    tokenizer = load_tokenizer(config.model, pad=False)  # as shipped: no pad added
    template = resolve_template(config, tokenizer)
    vocab = check_exportable(load_config(config.model), tokenizer)  # before the weights load
    model = load_causal_lm(config.model)
    if config.adapter:
        warn_if_another_base(config.model, config.adapter)
        load_adapter(model, config.adapter)
        model = merge_and_unload(model)
    # the Modelfile is made (and a template it cannot hold refused) before any file is written
    modelfile = modelfile_text(path, template, tokenizer, model, config) if config.ollama else None
    size = write_model_gguf(model, tokenizer, path, config.outtype, display_name(config), prompt_info(config, template),
                            vocab)
    if modelfile is not None:
        write_text_atomic(modelfile_path(path), modelfile)
    return ExportResult(path, size, 0.0, modelfile_path(path) if config.ollama else None)


@register_format("gguf-lora")
def export_adapter(config: ExportConfig) -> ExportResult:
    """Write the adapter alone as a llama.cpp LoRA GGUF, to apply on the base's GGUF."""
    from lorakit import load_adapter
    from lorakit.checkpoint.peft_io import read_adapter_config
    from lorakit.export.gguf_lora import check_head_is_apart, check_llama_cpp_can_apply, write_lora_gguf
    from lorakit.models import load_causal_lm, load_config

    path = config.output_path()
    check_writable(path, config.force, config.inputs())
    lora = read_adapter_config(config.adapter)
    check_llama_cpp_can_apply(lora, Path(config.adapter))
    base = config.model or lora.base_model_name_or_path
    if not base:
        raise ExportError(f"{config.adapter}: the adapter does not name its base; give --model")
    warn_if_another_base(base, config.adapter)
    check_exportable(load_config(base))  # before the weights load
    model = load_causal_lm(base)
    load_adapter(model, config.adapter)
    check_head_is_apart(model, Path(config.adapter))
    size = write_lora_gguf(model, lora, path, config.outtype, display_name(config))
    return ExportResult(path, size, 0.0)


def warn_if_another_base(model: str, adapter: str) -> None:
    """Warn where --model is not the base the adapter names: an adapter loads on any base of its shapes, and is
    then exported for that one (for another architecture, its q/k rows in another order)."""
    from lorakit.checkpoint.peft_io import read_adapter_config
    from lorakit.models import maybe_same_model

    named = read_adapter_config(adapter).base_model_name_or_path
    if named and not maybe_same_model(model, named):
        logger.warning("--model %s is not the base %s names (%s); exporting the adapter on %s", model, adapter,
                       named, model)


def display_name(config: ExportConfig) -> str:
    """`general.name`: the run's name for an adapter (its folder, or the run folder holding `adapter/`), else the
    model's (a .gguf file's without the suffix)."""
    return config.stem()


def resolve_template(config: ExportConfig, tokenizer: Any):
    """The prompt template lorakit generate would use: --template, the adapter's, else chat or raw."""
    from lorakit.data.templates import get_template
    from lorakit.run import read_run_card

    spec = config.template or read_run_card(config.adapter).get("template")
    if spec is None:
        spec = "chat" if getattr(tokenizer, "chat_template", None) else "{instruction}"
    return get_template(spec, tokenizer)


def prompt_info(config: ExportConfig, template: Any) -> PromptInfo:
    from lorakit.run import read_run_card

    task = read_run_card(config.adapter).get("task")
    if getattr(template, "prompt", None) is None:
        return PromptInfo(template.name, task=task)
    return PromptInfo(template.name, template.prompt, template.prompt_no_input, task)


def modelfile_text(path: Path, template: Any, tokenizer: Any, model: Any, config: ExportConfig) -> str:
    """The Ollama Modelfile for the GGUF at `path` (ExportError for a template it cannot hold)."""
    from lorakit.export.gguf_vocab import added_special_tokens
    from lorakit.export.ollama import PLACEHOLDER, modelfile_for
    from lorakit.infer.generate import stop_token_ids
    from lorakit.run import read_run_card

    rendered = template.render({"instruction": PLACEHOLDER, "output": ""})[0]
    bos = tokenizer.bos_token
    if template.special_tokens_in_prompt and bos and rendered.startswith(bos) and added_special_tokens(tokenizer)[0]:
        # lorakit tokenises this prompt without adding a BOS, where the GGUF's add_bos has Ollama put one in front
        rendered = rendered[len(bos):]
    stop = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer, model)]
    greedy = bool(read_run_card(config.adapter).get("task"))
    return modelfile_for(path.name, rendered, stop, greedy).text()
