"""Prompt templates (Jinja2), shipped as ``*.j2`` files beside this module.

Templates and the variables they receive:

- ``panel_system``: ``question``, ``member_index`` (0-based), ``panel_size``
- ``judge_analysis``: ``question``, ``responses`` (list of ``{label, content}``), ``labels``,
  ``tools`` (names of the tools the judge may call; empty when none)
- ``synthesis``: ``question``, ``responses``, ``analysis`` (dict or None), ``analysis_json``
- ``fusion_tool``: ``panel_size``: the description of the caller tier's ``fusion`` tool
- ``local_fewshot``: ``messages`` (list of ``{role, content, tool_calls, tool_names}``),
  ``tools``: the local base model's view of a chat
- ``eval_question``: ``prompt``, ``choices`` (list of ``{letter, text}``): an eval item as asked
- ``eval_rubric``: ``question``, ``answer``, ``criteria`` (list of ``{id, text}``): the rubric
  grader's prompt

A template is looked up in this order: the preset's own override (a file path), the user's
prompt dir (settings ``prompts_dir``, then ``<config dir>/prompts``), the shipped file. Each is
read once per process (a prompt edited later counts from the next start): checking files for
changes cost two ``stat`` calls per render, five renders per fusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from openfusion.errors import ConfigError

TEMPLATE_NAMES = (
    "panel_system",
    "judge_analysis",
    "synthesis",
    "local_fewshot",
    "fusion_tool",
    "eval_question",
    "eval_rubric",
)


class PromptSet:
    def __init__(
        self, search_dirs: Sequence[Path] = (), overrides: Mapping[str, Path] | None = None
    ) -> None:
        unknown = set(overrides or {}) - set(TEMPLATE_NAMES)
        if unknown:
            raise ConfigError(
                f"unknown prompt template(s) {sorted(unknown)}; known: {', '.join(TEMPLATE_NAMES)}"
            )
        loaders: list[jinja2.BaseLoader] = [jinja2.FileSystemLoader([str(d) for d in search_dirs])]
        loaders.append(jinja2.PackageLoader("openfusion", "prompts"))
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        self._overrides = dict(overrides or {})
        self._compiled: dict[str, jinja2.Template] = {}

    def render(self, name: str, **variables: Any) -> str:
        try:
            if name in self._overrides:
                if name not in self._compiled:
                    text = self._overrides[name].read_text(encoding="utf-8")
                    self._compiled[name] = self._env.from_string(text)
                template = self._compiled[name]
            else:
                template = self._env.get_template(f"{name}.j2")
            return template.render(**variables).strip()
        except OSError as exc:
            raise ConfigError(f"prompt template {name!r}: cannot read it: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ConfigError(f"prompt template {name!r}: {exc}") from exc
