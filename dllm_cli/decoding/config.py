"""``DecodeConfig``: every knob of one generation, validated once, plus the mode presets (spec §5.1, §5.2, §5.7).

Presets come from the GGUF (``dllm.preset.<mode>.*``) when the caller passes them, else from ``models.toml``
(``registry.version_presets``); explicit overrides always win.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from dllm_cli import domains
from dllm_cli.errors import UsageError, clip
from dllm_cli.registry import MODES, version_presets

DEFAULT_MAX_TOKENS = 512
_PRESET_FIELDS = ("threshold", "editing_threshold", "max_post_steps", "editing", "indel")


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Decoding parameters. ``block_length``/``steps`` None mean "the model's block length"."""

    mode: str = "speed"
    version: str = "2.1"  # "2.0": threshold schedule; "2.1": M2T (+T2T); "2.2": M2T (+T2T, +DELETE/INSERT)
    threshold: float = 0.5  # tau_mask, strict ">"
    editing_threshold: float = 0.0  # tau_edit, strict ">": 0.0 edits every differing argmax (NOT "disabled")
    max_post_steps: int = 16  # forwards allowed after the block has no masks left
    editing: bool = True  # T2T on/off; off -> pure M2T
    indel: bool = False  # LLaDA2.2 DELETE/INSERT edits on/off (needs editing); off keeps substitution only
    block_length: int | None = None
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    steps: int | None = None  # 2.0 transfer schedule length
    mbe: int = 0  # multi-block editing window (finished blocks kept editable); 0 = off
    stop_ids: tuple[int, ...] = ()  # extra stop ids besides the model's EOS
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        problem = _problem(self)
        if problem:
            raise UsageError(problem)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_ids"] = list(self.stop_ids)
        d["warnings"] = list(self.warnings)
        return d


_CHECKED = ("threshold", "editing_threshold", "top_p", "temperature", "top_k", "max_post_steps", "mbe",
            "max_tokens", "block_length", "steps", "seed")  # each has a domain in dllm_cli.domains


def _problem(c: DecodeConfig) -> str | None:
    """The first invalid setting as a one-line message naming the option, or None."""
    if c.mode not in MODES:
        return f"unknown mode {clip(c.mode)}: use one of {', '.join(MODES)}"
    for name in _CHECKED:
        v = getattr(c, name)
        if v is None and name in ("block_length", "steps", "seed"):
            continue
        problem = domains.problem(name, v)
        if problem:
            return problem
    if c.indel and c.version != "2.2":
        return f"--indel needs a LLaDA2.2 model (DELETE/INSERT tokens); this one is LLaDA{c.version}"
    if c.version == "2.2" and c.editing and c.temperature > 0:
        return ("LLaDA2.2 editing decodes greedily, as its reference decoder: use --temperature 0, or --no-edit "
                "to sample without editing")
    if c.version == "2.2" and c.mbe:
        return "--mbe (multi-block editing) is a LLaDA2.1 experiment; LLaDA2.2 files edit one block at a time"
    return None


def _preset_value(preset: Any, name: str) -> Any:
    default = False if name == "indel" else None  # presets written before LLaDA2.2 have no indel field
    return preset.get(name, default) if isinstance(preset, Mapping) else getattr(preset, name, default)


def make_config(mode: str, version: str, presets: Mapping[str, Any] | None = None, **overrides: Any) -> DecodeConfig:
    """Build a validated config: preset of ``mode`` (GGUF ``presets`` or the registry's) + ``overrides``.

    ``overrides`` whose value is None are ignored (unset CLI options). Asking for editing on a 2.0 model
    keeps it on but records a warning in ``config.warnings``.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {clip(mode)}: use one of {', '.join(MODES)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(DecodeConfig)} - {"mode", "version"})
    if unknown:
        raise UsageError(f"unknown decoding option {unknown[0]!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = (presets or {}).get(mode) or version_presets(version)[mode]
    values: dict[str, Any] = {name: _preset_value(preset, name) for name in _PRESET_FIELDS}
    values.update(overrides)
    warnings = list(values.pop("warnings", ()))
    if version == "2.0" and overrides.get("editing"):
        warnings.append("LLaDA2.0 was not trained for token editing (T2T); editing may degrade the output")
    elif not values["editing"] and {"editing_threshold", "max_post_steps"} & set(overrides):
        warnings.append("--editing-threshold/--max-post-steps have no effect while editing is off")
    values["stop_ids"] = tuple(values.get("stop_ids", ()))
    return DecodeConfig(mode=mode, version=version, warnings=tuple(warnings), **values)


def with_overrides(config: DecodeConfig, **changes: Any) -> DecodeConfig:
    """A validated copy of ``config`` with ``changes`` applied."""
    return replace(config, **changes)
