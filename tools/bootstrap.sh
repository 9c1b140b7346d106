# Sourced by run.sh and test.sh: installs what is missing, and nothing when everything is there.
# torch comes first and alone: on a CPU-only machine `torch==2.13.0` resolves to a local CPU build, while a plain
# `torch` requirement would pull several GB of CUDA packages.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch" >&2
  "$PYTHON" -m pip install -q torch==2.13.0
fi
# one Python start for every check (importing each in its own process costs seconds on 2 cores)
read -r -a missing <<< "$("$PYTHON" - <<'PY'
import importlib.util
packages = {"numpy": "numpy", "sentencepiece": "sentencepiece", "triton": "triton",
            "huggingface_hub": "huggingface_hub", "matplotlib": "matplotlib", "tqdm": "tqdm", "pytest": "pytest",
            "scipy": "scipy"}
print(" ".join(package for module, package in packages.items() if importlib.util.find_spec(module) is None))
PY
)"
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  "$PYTHON" -m pip install -q "${missing[@]}"
fi
