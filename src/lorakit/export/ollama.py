"""An Ollama `Modelfile` for an exported GGUF: FROM, the prompt TEMPLATE, stop tokens, parameters.

The TEMPLATE is made by rendering the training prompt (or the tokenizer's chat template) around a
placeholder and turning the placeholder into Ollama's `{{ .Prompt }}`, so Ollama sends the model
exactly the text lorakit trained on. `parse_modelfile` and `render_template` read such a file back
(the subset of Ollama's syntax lorakit writes), so the round trip can be checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.export.errors import ExportError

PLACEHOLDER = "\x00lorakit-prompt\x00"
_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)


@dataclass
class Modelfile:
    """The parts of a Modelfile lorakit writes and reads."""

    source: str  # FROM
    template: str  # TEMPLATE, in Ollama's Go-template syntax
    parameters: list[tuple[str, str]] = field(default_factory=list)  # PARAMETER name value, in order

    def text(self) -> str:
        if '"""' in self.template:
            raise ExportError('the prompt template contains """, which a Modelfile TEMPLATE cannot hold')
        lines = [f"FROM {self.source}", f'TEMPLATE """{self.template}"""']
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters]
        return "\n".join(lines) + "\n"


def go_template(rendered: str) -> str:
    """Turn a prompt rendered around `PLACEHOLDER` into a Go template with `{{ .Prompt }}`."""
    if rendered.count(PLACEHOLDER) != 1:
        raise ExportError("the prompt template must place the instruction exactly once to build an Ollama TEMPLATE")
    before, after = rendered.split(PLACEHOLDER)
    return _escape(before) + "{{ .Prompt }}" + _escape(after)


def _escape(text: str) -> str:
    """Literal text for a Go template: `{{` and `}}` become actions printing them."""
    return re.sub(r"\{\{|\}\}", lambda m: '{{ "' + m.group(0) + '" }}', text)


def modelfile_for(gguf_name: str, rendered_prompt: str, stop: list[str], greedy: bool) -> Modelfile:
    """A Modelfile for `gguf_name` (a path relative to the Modelfile's folder).

    Args:
        rendered_prompt: the training prompt rendered with `PLACEHOLDER` as the instruction.
        stop: texts of the tokens that end a reply (EOS and the like).
        greedy: write temperature 0 (adapters trained for a scored task decode greedily in lorakit).
    """
    parameters = [("stop", _quote(s)) for s in stop]
    if greedy:
        parameters.append(("temperature", "0"))
    return Modelfile(f"./{gguf_name}", go_template(rendered_prompt), parameters)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_modelfile(text: str) -> Modelfile:
    """Read FROM, TEMPLATE (triple-quoted or one line) and PARAMETER lines of a Modelfile."""
    source, template, parameters = None, None, []
    rest = text
    while rest:
        line, _, after = rest.partition("\n")
        keyword, _, value = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "TEMPLATE" and value.startswith('"""'):
            body, _, after = (value[3:] + "\n" + after).partition('"""')
            template = body
            after = after.partition("\n")[2]
        elif keyword == "TEMPLATE":
            template = _unquote(value)
        elif keyword == "FROM":
            source = value.strip()
        elif keyword == "PARAMETER":
            name, _, raw = value.strip().partition(" ")
            parameters.append((name, _unquote(raw.strip())))
        rest = after
    if source is None or template is None:
        raise ExportError("a Modelfile needs FROM and TEMPLATE lines")
    return Modelfile(source, template, parameters)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def render_template(template: str, prompt: str) -> str:
    """Render the Go-template subset lorakit writes: `{{ .Prompt }}` and quoted literals."""

    def action(match: re.Match) -> str:
        body = match.group(1)
        if body == ".Prompt":
            return prompt
        if len(body) >= 2 and body[0] == body[-1] == '"':
            return _unquote(body)
        raise ExportError(f"template action {{{{ {body} }}}} is outside the subset lorakit renders")

    return _ACTION.sub(action, template)


def modelfile_path(gguf_path: Path) -> Path:
    """Where `--ollama` writes the Modelfile: `Modelfile` beside the GGUF file."""
    return gguf_path.with_name("Modelfile")
