"""``models.toml`` -> frozen ``ModelSpec`` entries; resolving names to files, repos or aliases."""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from dllm_cli.errors import RegistryError

MODES = ("speed", "quality")
_PRESET_KEYS = {"threshold": float, "editing_threshold": float, "max_post_steps": int, "editing": bool}
_MODEL_KEYS = {"repo": str, "version": str, "params_total": str, "params_active": str, "description": str,
               "recommended_quant": str, "sizes_gb": dict}
_OPTIONAL_KEYS = {"file": str, "notes": str}


@dataclass(frozen=True)
class Preset:
    """Decode defaults of one mode."""

    threshold: float
    editing_threshold: float
    max_post_steps: int
    editing: bool
    indel: bool = False  # LLaDA2.2 DELETE/INSERT edits (only 2.2 presets set it)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    alias: str
    repo: str
    version: str
    params_total: str
    params_active: str
    description: str
    recommended_quant: str
    sizes_gb: dict[str, float] = field(hash=False)
    presets: dict[str, Preset] = field(hash=False)
    file: str = ""
    notes: str = ""  # caveats shown by `dllm models show` (e.g. unofficial presets)

    @property
    def embedded(self) -> bool:
        return bool(self.file) and not self.repo


def registry_path() -> Path:
    """models.toml inside the installed package (wheel) or at the repository root (editable)."""
    here = Path(__file__).resolve().parent
    for p in (here / "models.toml", here.parent / "models.toml"):
        if p.is_file():
            return p
    raise RegistryError("models.toml not found next to the dllm_cli package", "reinstall dllm-cli")


def _check(table: Any, keys: Mapping[str, type], where: str, optional: Mapping[str, type] | None = None) -> None:
    if not isinstance(table, dict):
        raise RegistryError(f"models.toml: {where} must be a table")
    optional = optional or {}
    for k in table:
        if k not in keys and k not in optional:
            raise RegistryError(f"models.toml: unknown key {where}.{k}", f"allowed: {', '.join(sorted({**keys, **optional}))}")
    for k, t in keys.items():
        if k not in table:
            raise RegistryError(f"models.toml: missing key {where}.{k}")
    for k, t in {**keys, **optional}.items():
        if k in table and not (isinstance(table[k], t) or (t is float and isinstance(table[k], int) and not isinstance(table[k], bool))):
            raise RegistryError(f"models.toml: {where}.{k} must be a {t.__name__}, got {table[k]!r}")


def parse_presets(raw: Any) -> dict[str, dict[str, Preset]]:
    """Validate the ``[presets."<version>".<mode>]`` tables."""
    if not isinstance(raw, dict) or not raw:
        raise RegistryError("models.toml: missing [presets] tables")
    out: dict[str, dict[str, Preset]] = {}
    for version, modes in raw.items():
        if not isinstance(modes, dict) or set(modes) != set(MODES):
            raise RegistryError(f"models.toml: presets.{version} must have exactly the modes {', '.join(MODES)}")
        out[version] = {}
        for mode, vals in modes.items():
            _check(vals, _PRESET_KEYS, f"presets.{version}.{mode}", {"indel": bool})
            out[version][mode] = Preset(float(vals["threshold"]), float(vals["editing_threshold"]),
                                        int(vals["max_post_steps"]), bool(vals["editing"]),
                                        bool(vals.get("indel", False)))
    return out


def parse_registry(doc: dict) -> dict[str, ModelSpec]:
    """Turn a parsed models.toml into specs; any malformed entry raises with the key named."""
    unknown = set(doc) - {"presets", "models"}
    if unknown:
        raise RegistryError(f"models.toml: unknown top-level key {sorted(unknown)[0]}")
    presets = parse_presets(doc.get("presets"))
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError("models.toml: missing [models] tables")
    specs: dict[str, ModelSpec] = {}
    for alias, entry in models.items():
        _check(entry, _MODEL_KEYS, f"models.{alias}", _OPTIONAL_KEYS)
        if entry["version"] not in presets:
            raise RegistryError(f"models.toml: models.{alias}.version {entry['version']!r} has no [presets] table")
        specs[alias] = ModelSpec(alias=alias, presets=presets[entry["version"]], **entry)
    return specs


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict[str, ModelSpec], dict[str, dict[str, Preset]]]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"models.toml is not valid TOML: {e}") from None
    return parse_registry(doc), parse_presets(doc.get("presets"))


def load_registry(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """All registry entries by alias."""
    return _load(str(path or registry_path()))[0]


def version_presets(version: str) -> dict[str, Preset]:
    """The speed/quality presets of a model version ("2.0", "2.1", "2.2")."""
    presets = _load(str(registry_path()))[1]
    if version not in presets:
        raise RegistryError(f"no presets for model version {version!r}", f"known: {', '.join(presets)}")
    return presets[version]


def get_spec(alias: str) -> ModelSpec:
    """The entry for ``alias`` or a RegistryError listing the known ones."""
    specs = load_registry()
    if alias not in specs:
        from dllm_cli.errors import clip

        raise RegistryError(f"unknown model alias {clip(alias)}", f"known: {', '.join(specs)}; see `dllm models`")
    return specs[alias]


def dllm_home() -> Path:
    """``$DLLM_HOME`` (default ``~/.cache/dllm``): runtime builds and the local model store."""
    return Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")


def models_dir() -> Path:
    """Where converted models live: ``$DLLM_HOME/models/<alias>.gguf``."""
    return dllm_home() / "models"


def embedded_model_path() -> Path:
    """The demo GGUF shipped inside the package."""
    return Path(__file__).resolve().parent / "demo" / "demo.gguf"


def as_path(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~user" with no such user
        return Path(text)


def is_file(p: Path) -> bool:
    """``p.is_file()`` that is False (not an exception) for names the OS refuses (too long, NUL bytes)."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def names_model(text: str) -> bool:
    """True when ``text`` is an existing file or a registry alias: how a lone CLI argument is told from a
    prompt (``What is 1/2?`` is a prompt, not a missing model path)."""
    return text in load_registry() or is_file(as_path(text))


def local_files(aliases: list[str]) -> dict[str, list[Path]]:
    """alias -> its converted GGUFs in the local store, sorted. A file belongs to the longest alias it is named
    after: ``llada2.0-mini-cap-bf16.gguf`` is llada2.0-mini-cap's, not llada2.0-mini's."""
    store = models_dir()
    found: dict[str, list[Path]] = {a: [] for a in aliases}
    for f in sorted(store.glob("*.gguf")) if store.is_dir() else []:
        owners = [a for a in aliases if f.name == f"{a}.gguf" or f.name.startswith(f"{a}-")]
        if owners:
            found[max(owners, key=len)].append(f)
    return found


def resolve_model(name: str | None) -> Path:
    """A GGUF path from a path, a registry alias converted into the local store, ``$DLLM_MODEL``,
    or the embedded demo model when nothing is given."""
    from dllm_cli.errors import ModelError

    from dllm_cli.errors import clip

    name = name or os.environ.get("DLLM_MODEL") or "demo"
    p = as_path(name)
    if is_file(p):
        return p
    specs = load_registry()
    if name in specs:
        spec = specs[name]
        if spec.embedded:
            path = embedded_model_path()
            if not path.is_file():
                raise ModelError("the embedded demo model is missing from this install", "reinstall dllm-cli")
            return path
        found = local_files(list(specs))[name]
        preferred = [f for f in found if spec.recommended_quant in f.name]
        if preferred or found:
            return (preferred or found)[0]
        raise ModelError(f"model {name!r} is not converted yet", f"run `dllm convert {name}` first")
    if p.suffix == ".gguf" or "/" in name or "\\" in name:
        raise ModelError(f"model file not found: {clip(name, quote=False)}",
                         "check the path, or see `dllm models`")
    raise ModelError(f"unknown model {clip(name)}", f"give a .gguf path or one of: {', '.join(specs)}")
