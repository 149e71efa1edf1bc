"""The router's models: the GGUF files of `--models-dir` and the sections of `--models-preset`
(llama-server's INI presets), each as a `ModelSpec` whose child command line is decided here.

A preset's keys are flag names without dashes (`ctx-size = 1024`, `c = 1024`, `jinja = false`),
plus three of llama-server's own: `model` (the GGUF, relative to the INI's folder), `load-on-startup`,
`stop-timeout`. `[*]` applies to every model. Precedence, highest first: the router's command
line, the model's section, `[*]`; argparse's last-one-wins gives it when the child's arguments
are written in the reverse order. A bad file is a `PresetError` naming its line (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field

from . import hf_cache

DEFAULT_STOP_TIMEOUT = 10.0  # seconds an unloaded child has after SIGINT before SIGKILL (llama-server's)
# the router's own flags: not handed down to the children
ROUTER_ONLY = {"models_dir", "models_preset", "models_max", "models_autoload", "host", "port",
               "api_key", "api_key_file", "agent_port", "drain_delay", "drain_timeout", "path",
               "models_memory", "models_share_cpus", "model", "alias", "cors_origin", "cors_origins",
               "cors_methods", "cors_headers",
               "cors_credentials", "max_connections_per_ip", "timeout_head", "threads_http"}
# Hugging Face keys of llama-server's presets: read (a section with hf-repo and no model file is
# listed, loads from the local cache if it is there, else fails: nothing is downloaded here),
# never passed to a child
HF_KEYS = {"hf-repo", "hf", "hfr", "hf-file", "hff", "spec-draft-hf", "hfd", "hfrd", "hf-repo-draft",
           "dedup-cache-models"}
PRESET_ONLY = {"model", "m", "load-on-startup", "stop-timeout", "alias", "a", "version"}
TRUTHY = {"1", "true", "on", "yes", "enabled"}
FALSY = {"0", "false", "off", "no", "disabled"}


class PresetError(ValueError):
    """A preset file or models folder that cannot be served; the message names the line."""


@dataclass
class ModelSpec:
    name: str
    path: str
    aliases: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # the child's flags (no -m, --host, --port)
    load_on_startup: bool = False
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    source: str = "models_dir"  # or "preset", "cache" (the Hugging Face cache: server.router.hf_cache)
    memory_mib: float = 0.0     # what it will take loaded (server.router.memory), 0: unknown
    hf_repo: str = ""           # `hf-repo = ...` without a model file: loaded from the cache, if there


def scan_models_dir(folder: str) -> dict[str, str]:
    """{name: GGUF path}: each `name.gguf`, and each subfolder holding GGUF files (its first
    shard `-00001-of-`, else its one model file; mmproj files are left out)."""
    if not os.path.isdir(folder):
        raise PresetError(f"--models-dir: '{folder}' does not exist or is not a directory")
    out: dict[str, str] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            files = sorted(f for f in os.listdir(entry.path)
                           if f.endswith(".gguf") and "mmproj" not in f.lower())
            first = [f for f in files if "-00001-of-" in f] or files
            if first:
                out[entry.name] = os.path.join(entry.path, first[0])
        elif entry.name.endswith(".gguf") and "mmproj" not in entry.name.lower():
            out[entry.name[:-len(".gguf")]] = entry.path
    return out


_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\]\s*(?:[;#].*)?$")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*?)\s*(?:\s[;#].*)?$")


def read_ini(path: str) -> dict[str, dict[str, tuple[str, int]]]:
    """{section: {key: (value, line number)}}; keys before any section go to "*"."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PresetError(f"--models-preset: cannot read '{path}': {e}") from None
    out: dict[str, dict[str, tuple[str, int]]] = {}
    section = "*"
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            if not section:
                raise PresetError(f"{path}:{i}: empty section name: {raw!r}")
            out.setdefault(section, {})
            continue
        m = _KEY.match(line)
        if not m:
            raise PresetError(f"{path}:{i}: expected '[section]' or 'key = value', got {raw!r}")
        out.setdefault(section, {})[m.group(1)] = (m.group(2), i)
    return out


def option_args(parser: argparse.ArgumentParser, key: str, value: str, where: str) -> list[str]:
    """One preset key as command-line arguments (a flag taking no value: set or its negation)."""
    actions = parser._option_string_actions
    flag = next((f for f in ("--" + key, "-" + key, "--" + key.replace("_", "-")) if f in actions), None)
    if flag is None:
        raise PresetError(f"{where}: option '{key}' is not a flag of this server")
    action = actions[flag]
    if action.nargs != 0:
        return [flag, value]
    on = _truthy(value, where)
    pos = [o for o in action.option_strings if not o.startswith("--no-")]
    neg = [o for o in action.option_strings if o.startswith("--no-")]
    if pos and neg:  # --x / --no-x in one action (BooleanOptionalAction)
        return [pos[-1] if on != (flag in neg) else neg[-1]]
    # store_true / store_false: the action of the same dest that stores the value wanted
    want = action.const if on else not action.const
    for other in parser._actions:
        if other.dest == action.dest and other.nargs == 0 and other.const == want:
            return [other.option_strings[-1]]
    return []


def forwarded_args(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The router's command line less its own flags: what every child gets, last (it wins)."""
    actions = parser._option_string_actions
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name, eq, _ = tok.partition("=")
        action = actions.get(name if eq else tok)
        n = 0 if action is None or eq else (1 if action.nargs is None else
                                             action.nargs if isinstance(action.nargs, int) else 1)
        if action is None or action.dest not in ROUTER_ONLY:
            out += argv[i:i + 1 + n]
        i += 1 + n
    return out


def _truthy(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v not in TRUTHY | FALSY:
        raise PresetError(f"{where}: expected true or false, got {value!r}")
    return v in TRUTHY


def _apply(spec: ModelSpec, parser, layer: dict[str, tuple[str, int]], preset: str, base: str) -> None:
    """A section's keys onto a model: its path, aliases, start-up and stop settings, flags."""
    for key, (value, line) in layer.items():
        at = f"{preset}:{line}"
        if key in ("model", "m"):
            spec.path = value if os.path.isabs(value) else os.path.join(base, value)
        elif key in ("alias", "a"):
            spec.aliases = [a.strip() for a in value.split(",") if a.strip()]
        elif key == "load-on-startup":
            spec.load_on_startup = _truthy(value, at)
        elif key == "stop-timeout":
            try:
                spec.stop_timeout = float(value)
            except ValueError:
                raise PresetError(f"{at}: stop-timeout must be a number of seconds, got {value!r}") from None
        elif key in HF_KEYS:
            if key in ("hf-repo", "hf", "hfr"):
                spec.hf_repo = value
        elif key != "version":
            spec.args += option_args(parser, key, value, at)


def load_specs(parser: argparse.ArgumentParser, models_dir: str | None, preset: str | None,
               router_argv: list[str]) -> dict[str, ModelSpec]:
    """Every model the router serves, by name, with its child's flags: [*], then the model's
    section, then the router's command line (the last one given wins). The models of the
    Hugging Face cache come first; a models folder's of the same name replace them."""
    found = scan_models_dir(models_dir) if models_dir else {}
    ini = read_ini(preset) if preset else {}
    base = os.path.dirname(os.path.abspath(preset)) if preset else ""
    star = ini.pop("*", {})
    star_flags = {k: v for k, v in star.items() if k not in ("model", "m", "alias", "a")}
    specs = {name: ModelSpec(name, path, source="cache") for name, path in hf_cache.cached_models().items()}
    specs.update({name: ModelSpec(name, path) for name, path in found.items()})
    for name in ini:
        spec = specs.setdefault(name, ModelSpec(name, "", source="preset"))
        if spec.source == "cache":  # llama-server's: a section makes it the preset's (not removable)
            spec.source = "preset"
    tail = forwarded_args(parser, router_argv)
    for name, spec in specs.items():
        _apply(spec, parser, star_flags, preset or "", base)
        _apply(spec, parser, ini.get(name, {}), preset or "", base)
        if not spec.path and spec.hf_repo:
            spec.path = hf_cache.resolve(spec.hf_repo)
        if not spec.path and not spec.hf_repo:
            raise PresetError(f"{preset}: [{name}]: no 'model = PATH' and no such model in --models-dir")
        spec.args += tail
    return specs
