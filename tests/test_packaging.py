"""Installable where Triton has no wheels: the dependency is Linux-only, and without it the package imports, the
portable backends run, and the Triton ones say why they cannot; the flash extra names the flash-attn versions
whose internals the backend calls; the constraints file pins what the tests ran with."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(r) for r in deps]


def wanted_on(platform: str) -> set[str]:
    env = dict(default_environment(), sys_platform=platform, platform_system={"darwin": "Darwin",
               "win32": "Windows", "linux": "Linux"}[platform])
    return {r.name for r in requirements() if r.marker is None or r.marker.evaluate(env)}


def test_triton_is_a_linux_only_dependency():
    assert "triton" in wanted_on("linux")
    assert "triton" not in wanted_on("darwin") and "triton" not in wanted_on("win32")
    assert {"torch", "deepspeed", "ray", "transformers", "webdataset", "pyarrow"} <= wanted_on("darwin")


def test_the_flash_extra_names_the_versions_the_backend_was_written_for():
    (flash,) = requirements("flash")
    assert flash.name == "flash-attn"
    assert "2.7.0" in flash.specifier and "2.8.3" in flash.specifier  # the window_size_left/right signature
    assert "2.6.3" not in flash.specifier and "2.9.0" not in flash.specifier


@pytest.mark.skipif(os.environ.get("JEPA4REC_UNPINNED") == "1",
                    reason="`make test-latest`: installed without constraints.txt on purpose (the newest versions)")
def test_constraints_pin_the_installed_versions():
    from importlib.metadata import version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name.lower().replace("_", "-")] = pinned
    for dist in ("torch", "deepspeed", "transformers", "webdataset", "pyarrow", "ray", "triton", "numpy"):
        assert dist in pins, dist
        assert version(dist).split("+")[0] == pins[dist], (dist, version(dist), pins[dist])


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # what a platform without triton wheels looks like to an import
import torch
from jepa4rec_dist.kernels.infonce import available_backends as loss_backends, infonce_loss
from jepa4rec_dist.kernels.local_global_attention import available_backends as attention_backends, local_global_attention
from jepa4rec_dist.config import load_config
from jepa4rec_dist.model import build_encoder
q, k, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
print("loss", sorted(loss_backends("cpu")), float(infonce_loss(q, k, t)) > 0)
print("attention", sorted(attention_backends("cpu")))
for backend in ("triton", "gemm"):
    try:
        infonce_loss(q, k, t, backend=backend)
    except RuntimeError as exc:
        print(backend, "refused:", exc)
x = torch.randn(1, 2, 16, 8)
try:
    local_global_attention(x, x, x, window=2, backend="triton")
except RuntimeError as exc:
    print("attention triton refused:", exc)
print("attention ran", tuple(local_global_attention(x, x, x, window=2).shape))
cfg = load_config([sys.argv[1]], ["--model.vocab_size=100"])
enc = build_encoder(cfg.model, None, with_head=False)[0]
print("encoder", type(enc).__name__, "triton" in sys.modules and sys.modules["triton"] is not None)
"""


def test_without_triton_the_package_runs_and_the_triton_backends_say_why():
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, str(REPO / "configs/model/tiny.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                                            "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "loss ['chunked', 'reference'] True" in out
    assert "triton" not in out.split("attention", 1)[1].split("\n", 1)[0]
    for backend in ("triton", "gemm"):
        assert f"{backend} refused: infonce backend '{backend}' cannot run here: triton is not installed" in out, out
    assert "attention triton refused:" in out and "triton is not installed" in out.split("attention triton refused:")[1]
    assert "attention ran (1, 2, 16, 8)" in out and "encoder Encoder False" in out, out


def test_no_import_name_here_belongs_to_another_distribution():
    """From the repository root (where users run pytest, benchmarks/run.py and launch/*) every folder holding an
    __init__.py and every .py file is imported by its name ahead of site-packages: none may be a name that another
    installed distribution provides. (A top-level `kernels/` once shadowed Hugging Face's `kernels` package, which
    transformers 5.25 imports; the kernels live in jepa4rec_dist.kernels now.) The wheel holds jepa4rec_dist only."""
    from importlib.metadata import packages_distributions

    here = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()} | {p.stem for p in REPO.glob("*.py")}
    assert "jepa4rec_dist" in here and "kernels" not in here
    owners = packages_distributions()
    clashes = {name: owners[name] for name in sorted(here) if set(owners.get(name, ())) - {"jepa4rec-dist"}}
    assert not clashes, f"import names of this repository that other installed distributions own: {clashes}"
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["jepa4rec_dist*"]
