"""The Dockerfile: hadolint (real binary), and what can be checked without a Docker engine — its pins
agree with the Makefile and pyproject, its paths and user with the Helm chart, and its shell snippets
(prebuild loop, GPU requirements, HEALTHCHECK) do what they claim when run for real."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from shrinkserve.server.settings import default_config_path
from tests.conftest import REPO, ServerProcess, free_port
from tests.test_helm import find_tool
from tests.test_lock import lock_pins

DOCKERFILE = REPO / "Dockerfile"
CHART_VALUES = REPO / "helm" / "shrinkserve" / "values.yaml"


@dataclass
class Instruction:
    stage: str
    op: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, each tagged with its stage."""
    out: list[Instruction] = []
    logical, stage = "", ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not logical:
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1]
            continue
        logical += line
        if logical.strip():
            op, _, args = logical.strip().partition(" ")
            op = op.upper()
            if op == "FROM":
                m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
                stage = m.group(1) if m else args
            out.append(Instruction(stage, op, args.strip()))
        logical = ""
    return out


INSTR = parse(DOCKERFILE.read_text())


def args_of(op: str, stage: str | None = None) -> list[str]:
    return [i.args for i in INSTR if i.op == op and (stage is None or i.stage == stage)]


def arg_default(name: str) -> str:
    for a in args_of("ARG"):
        key, _, value = a.partition("=")
        if key == name:
            return value.strip('"')
    raise KeyError(name)


def makefile_var(name: str) -> str:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(rf"^{name}\s*:=\s*(.*)$", text, re.MULTILINE)
    assert m, name
    return m.group(1)


def test_hadolint_passes_with_only_justified_ignores() -> None:
    r = subprocess.run([find_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[n - 1].strip() if n else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"Dockerfile:{n + 1}: `{line.strip()}` needs a comment line above saying why")


def test_hadolint_actually_lints() -> None:
    # Guards the guard: a Dockerfile with classic mistakes must produce findings.
    bad = "FROM python:latest\nRUN apt-get install curl\nRUN pip install requests\n"
    r = subprocess.run([find_tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3013" in r.stdout


def test_multi_stage_layout() -> None:
    stages = [i.stage for i in INSTR if i.op == "FROM"]
    assert stages == ["base", "builder", "venv-cpu", "venv-gpu", "venv-vllm", "runtime", "gpu", "cpu"]
    assert stages[-1] == "cpu", "the default target (last stage) must be the CPU image"
    froms = {i.stage: i.args.split()[0] for i in INSTR if i.op == "FROM"}
    # The runtime line never sees the compiler: it descends from `base`, not from `builder`.
    assert froms["runtime"] == "base" and froms["gpu"] == froms["cpu"] == "runtime"
    assert any("build-essential" in a for a in args_of("RUN", "builder"))
    assert not any("build-essential" in a for s in ("base", "runtime", "gpu", "cpu") for a in args_of("RUN", s))
    for stage, venv in (("gpu", "venv-gpu"), ("cpu", "venv-cpu")):
        assert f"--from={venv} /opt/venv /opt/venv" in args_of("COPY", stage)
        user = args_of("USER", stage)
        assert user and user[-1] in ("${UID}", arg_default("UID")) and int(arg_default("UID")) != 0
        volume = json.loads(args_of("VOLUME", stage)[-1])
        assert volume == ["/var/cache/shrinkserve"]
    # vLLM in its own venv, copied beside ours and found through SHRINKSERVE_VLLM_PYTHON.
    assert "vllm" not in " ".join(args_of("RUN", "venv-gpu"))
    assert ("/opt/vllm/bin/pip install --no-cache-dir --require-hashes --no-deps -r /tmp/vllm.lock.txt"
            in " ".join(args_of("RUN", "venv-vllm")))
    assert "requirements/docker-vllm-gpu.lock.txt /tmp/vllm.lock.txt" in args_of("COPY", "venv-vllm")
    assert "--from=venv-vllm /opt/vllm /opt/vllm" in args_of("COPY", "gpu")
    assert "SHRINKSERVE_VLLM_PYTHON=/opt/vllm/bin/python" in args_of("ENV", "gpu")
    assert args_of("EXPOSE", "runtime") == ["8000"]
    assert args_of("CMD", "runtime") == ['["shrinkserve", "serve"]']


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for a in args_of("ENV", "runtime"):
        for part in shlex.split(a):
            k, _, v = part.partition("=")
            env[k] = v
    return env


LOCKED = "pip install --no-cache-dir --require-hashes --no-deps"


def test_venvs_install_the_locks_with_the_makefiles_build_flags() -> None:
    image = arg_default("LLAMA_CMAKE_ARGS").split()
    common = makefile_var("LLAMA_COMMON_ARGS").split()
    assert image[-len(common):] == common  # the Makefile's build options, AMX off
    # A portable instruction set (the Makefile reads this machine's): AVX2, no AVX-512 (SIGILL without it).
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_BF16=OFF"} <= set(image)
    isa = subprocess.run(["bash", str(REPO / "scripts" / "llama_isa_args.sh")], capture_output=True, text=True)
    assert {f.split("=")[0] for f in isa.stdout.split()} == {f.split("=")[0] for f in image[:-len(common)]}
    assert 'CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"' in args_of("ENV", "builder")
    assert "requirements/ requirements/" in args_of("COPY", "builder")
    for stage, lock in (("venv-cpu", "docker-cpu"), ("venv-gpu", "docker-gpu")):
        run = " ".join(" ".join(args_of("RUN", stage)).split())
        # The locked build tools first, then the lock without resolution or build isolation, then the project.
        build, locked, project = (run.index(f"{LOCKED} -r requirements/build.lock.txt"),
                                  run.index(f"-r requirements/{lock}.lock.txt"),
                                  run.index("pip install --no-cache-dir --no-deps --no-build-isolation ."))
        assert build < locked < project, stage
        assert f"{LOCKED} --no-build-isolation" in run, stage
    # No stage installs anything by name, outside a lock.
    for i in INSTR:
        if i.op == "RUN" and "pip install" in i.args:
            for cmd in re.split(r"&&", i.args):
                if "pip install" in cmd:
                    assert "-r " in cmd or cmd.rstrip().endswith(" ."), cmd
    cpu = " ".join(args_of("RUN", "venv-cpu"))
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu


def test_copies_every_source_folder_the_package_needs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = {p.rstrip("/") for a in args_of("COPY", "builder") for p in a.split()[:-1]}
    assert folders | {"pyproject.toml", "README.md"} <= copied, f"the image would miss {folders - copied}"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git"} <= ignored
    assert not ignored & (folders | {"pyproject.toml", "README.md"}), "the build context must keep what COPY needs"


def test_image_agrees_with_the_helm_chart() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    env = runtime_env()
    assert int(env["SHRINKSERVE_PORT"]) == values["server"]["port"] == int(args_of("EXPOSE", "runtime")[0])
    assert env["SHRINKSERVE_CACHE_DIR"] == values["cache"]["mountPath"] == json.loads(args_of("VOLUME", "cpu")[0])[0]
    assert int(arg_default("UID")) == values["podSecurityContext"]["runAsUser"]
    assert env["SHRINKSERVE_HOST"] == "0.0.0.0"
    # With a read-only root filesystem, library caches must point at /tmp (an emptyDir in the chart).
    for key in ("HF_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env[key].startswith("/tmp/"), key


def prebuild_script() -> str:
    return next(a for a in args_of("RUN", "cpu") if "shrinkserve compress" in a)


def test_prebuild_builds_exactly_the_default_profiles(tmp_path: Path) -> None:
    default_profiles = set(yaml.safe_load(default_config_path().read_text())["profiles"])
    prebuild = arg_default("PREBUILD_PROFILES").split()
    assert set(prebuild) == default_profiles
    # Run the RUN line under /bin/sh (the runtime stage sets no SHELL) with a stub `shrinkserve`.
    stub = tmp_path / "shrinkserve"
    stub.write_text('#!/bin/sh\necho "$@" > "$STUB_OUT"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    for value, expected in ((" ".join(prebuild), "compress " + " ".join(f"--profile {p}" for p in prebuild)),
                            ("", None)):
        out = tmp_path / "args"
        out.unlink(missing_ok=True)
        script = prebuild_script().replace("${PREBUILD_PROFILES}", "$PREBUILD_PROFILES")
        r = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30,
                           env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PREBUILD_PROFILES": value,
                                "STUB_OUT": str(out)})
        assert r.returncode == 0, r.stderr
        assert (out.read_text().strip() if out.exists() else None) == expected


def test_gpu_venv_is_the_project_with_cuda_torch() -> None:
    run = " ".join(args_of("RUN", "venv-gpu"))
    assert "download.pytorch.org/whl/cpu" not in run and "vllm" not in run
    # PyPI's torch (the CUDA build) at the release the CPU lock has, everything else as the suite ran it.
    locked = lock_pins(REPO / "requirements" / "docker-gpu.lock.txt")
    tested = lock_pins(REPO / "requirements" / "main.lock.txt")
    assert locked["torch"] == tested["torch"].split("+")[0] and "+" not in locked["torch"]
    assert {n: v for n, v in locked.items() if n != "torch" and n in tested} == {
        n: tested[n] for n in locked if n != "torch" and n in tested}

def healthcheck_argv() -> list[str]:
    hc = args_of("HEALTHCHECK", "runtime")[0]
    opts = dict(re.findall(r"--([a-z-]+)=(\S+)", hc))
    assert {"interval", "timeout", "start-period", "retries"} <= set(opts)
    return json.loads(hc[hc.index("CMD") + 3:].strip())


def test_healthcheck_command_probes_health_of_a_live_server(server: ServerProcess) -> None:
    argv = healthcheck_argv()
    assert argv[0] == "python" and "/health" in argv[-1]
    env = {**os.environ, "SHRINKSERVE_PORT": str(server.port)}
    ok = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run([sys.executable, *argv[1:]], env={**env, "SHRINKSERVE_PORT": str(free_port())},
                          capture_output=True, timeout=30)
    assert down.returncode != 0
