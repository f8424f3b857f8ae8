"""The dependency policy holds together: the lock pins every declared dependency inside setup.cfg's bounds, the
oldest set sits on the lower bounds, and the packages the code imports directly are declared."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def declared(extra: str | None = None) -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    text = cfg["options"]["install_requires"] if extra is None else cfg["options.extras_require"][extra]
    reqs = [Requirement(line.strip()) for line in text.splitlines() if line.strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            out[canonicalize_name(package)] = Version(version)
    return out


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
    locked = pins("constraints.txt")
    for requirement in [*declared().values(), *declared("test").values()]:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(locked[name], prereleases=True), \
            f"constraints.txt pins {name}=={locked[name]}, outside setup.cfg's {requirement}"
    # the README installs torch first by this exact version; a local build tag would refuse a CUDA build
    assert str(locked["torch"]) == "2.13.0"


def test_the_oldest_set_sits_on_the_lower_bounds():
    oldest = pins("constraints-oldest.txt")
    core = declared()
    for name, version in oldest.items():
        if name == "torch":
            continue
        requirement = core.get(name) or declared("lora").get(name)
        assert requirement is not None, f"constraints-oldest.txt pins {name}, which setup.cfg does not declare"
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lower == [version], f"{name}: setup.cfg's lower bound {lower} is not the tested oldest {version}"


def test_upper_bounds_where_the_code_uses_moving_apis():
    core = declared()
    for name in ("transformers", "deepspeed", "submitit", "torch"):
        assert any(s.operator == "<" for s in core[name].specifier), f"{name} needs an upper bound"
    assert any(s.operator == "<" for s in declared("vllm")["vllm"].specifier)
    assert str(declared("test")["trl"].specifier) == "==1.16.0"


def test_direct_imports_are_declared():
    imported = set()
    for path in (REPO / "hpc_rlhf").rglob("*.py"):
        imported |= set(re.findall(r"^\s*(?:import|from) (safetensors|huggingface_hub|gguf|tokenizers|yaml|tqdm)\b",
                                   path.read_text(), flags=re.MULTILINE))
    names = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}
    core = declared()
    for module in imported:
        assert canonicalize_name(names.get(module, module)) in core, f"hpc_rlhf imports {module} but does not declare it"
