"""The lock files in requirements/ are what every machine installs: they agree with pyproject.toml and the
.in files, carry hashes, are what the install commands read, and are what this very environment holds."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

REQ = REPO / "requirements"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def lock_pins(path: Path) -> dict[str, str]:
    """name → version of each entry in a lock file written by `make lock`."""
    pins = {}
    for line in path.read_text().splitlines():
        m = ENTRY.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def requirements_of(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(Requirement(line))
    return reqs


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def assert_satisfied(reqs: list[Requirement], pins: dict[str, str], lock: str) -> None:
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {lock}: run `make lock`"
        version = Version(pins[name])
        # A local build (2.13.0+cpu) satisfies ==2.13.0, as pip installs it.
        ok = any(req.specifier.contains(v, prereleases=True) for v in (version, Version(version.public)))
        assert ok, f"{lock} has {name}=={version}, the inputs want {req}: run `make lock`"


LOCKS = sorted(REQ.glob("*.lock.txt"))


def test_every_lock_exists_and_every_entry_carries_hashes() -> None:
    assert {p.name for p in LOCKS} == {"build.lock.txt", "main.lock.txt", "vllm.lock.txt", "docker-cpu.lock.txt",
                                       "docker-gpu.lock.txt", "docker-vllm-gpu.lock.txt"}
    for lock in LOCKS:
        text = lock.read_text()
        entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
        assert len(entries) > 3, lock.name
        for entry in entries:
            if ENTRY.match(entry):
                assert "--hash=sha256:" in entry, f"{lock.name}: {entry.splitlines()[0]} has no hash"


def test_the_main_lock_agrees_with_pyproject_and_the_in_files() -> None:
    main = lock_pins(REQ / "main.lock.txt")
    assert_satisfied(pyproject_requirements(), main, "main.lock.txt")
    assert_satisfied(requirements_of(REQ / "main.in"), main, "main.lock.txt")
    build = lock_pins(REQ / "build.lock.txt")
    assert_satisfied(requirements_of(REQ / "build.in"), build, "build.lock.txt")
    # Both are installed into one venv: a package in both has one version.
    assert {n: v for n, v in build.items() if n in main} == {n: main[n] for n in build if n in main}


def test_vllm_locks_agree_with_their_inputs() -> None:
    vllm = lock_pins(REQ / "vllm.lock.txt")
    assert_satisfied(requirements_of(REQ / "vllm.in"), vllm, "vllm.lock.txt")
    assert vllm["torch"].endswith("+cpu")
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(vllm)  # they break `import vllm` on CPU torch
    assert_satisfied(requirements_of(REQ / "docker-vllm-gpu.in"), lock_pins(REQ / "docker-vllm-gpu.lock.txt"),
                     "docker-vllm-gpu.lock.txt")


def test_the_cpu_image_gets_the_versions_the_suite_ran_with() -> None:
    image, main = lock_pins(REQ / "docker-cpu.lock.txt"), lock_pins(REQ / "main.lock.txt")
    assert_satisfied([r for r in pyproject_requirements()[:len(tomllib.loads((REPO / "pyproject.toml").read_text())
                      ["project"]["dependencies"])]], image, "docker-cpu.lock.txt")
    assert set(image) <= set(main) and all(image[n] == main[n] for n in image)
    assert "pytest" not in image  # the test tools stay out of the image


def installed(python_dists: list[metadata.Distribution]) -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in python_dists}


def test_this_environment_is_exactly_the_lock() -> None:
    have = installed(list(metadata.distributions()))
    want = lock_pins(REQ / "main.lock.txt") | lock_pins(REQ / "build.lock.txt")
    wrong = {n: (have.get(n), v) for n, v in want.items() if have.get(n) != v}
    assert not wrong, f"installed vs locked (run `make setup` after `make lock`): {wrong}"
    extra = set(have) - set(want) - {"pip", "shrinkserve"}
    assert not extra, f"installed but not in the lock: {sorted(extra)}"


def test_the_vllm_environment_is_exactly_its_lock() -> None:
    site = sorted((REPO / ".venv-vllm").glob("lib/python3*/site-packages"))
    if not site:
        pytest.skip(".venv-vllm is not set up (make vllm)")
    have = installed(list(metadata.distributions(path=[str(site[0])])))
    want = lock_pins(REQ / "vllm.lock.txt")
    assert {n: have.get(n) for n in want} == want
    assert set(have) - set(want) <= {"pip", "setuptools"}


def install_lines(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines()
            if re.search(r"\bpip\"? install\b", line) and not line.lstrip().startswith("#")]


def test_setup_and_vllm_install_only_from_the_locks() -> None:
    lines = install_lines(REPO / "Makefile") + install_lines(REPO / "scripts" / "setup_vllm.sh")
    assert len(lines) == 4, lines
    for line in lines:
        locked = re.search(r"--require-hashes --no-deps .*-r (\S*requirements/\S+\.lock\.txt|\"\$LOCK\")", line)
        project = re.search(r"pip install --no-deps --no-build-isolation -e \.$", line.strip())
        assert locked or project, f"installs outside a lock: {line}"
    setup_vllm = (REPO / "scripts" / "setup_vllm.sh").read_text()
    assert 'LOCK="$ROOT/requirements/vllm.lock.txt"' in setup_vllm
