# Sourced by run.sh and test.sh: installs what is missing, and nothing when everything is there.
# torch comes first and alone: on a CPU-only machine `torch==2.13.0` resolves to a local CPU build, while a plain
# `torch` requirement would pull several GB of CUDA packages.
PYTHON=${PYTHON:-python3}
# one Python start for every check, by find_spec (importing torch alone costs ~3 s on 2 cores)
read -r -a missing <<< "$("$PYTHON" - <<'PY'
import importlib.util
packages = {"torch": "torch==2.13.0", "numpy": "numpy", "sentencepiece": "sentencepiece", "triton": "triton",
            "huggingface_hub": "huggingface_hub", "matplotlib": "matplotlib", "tqdm": "tqdm", "pytest": "pytest",
            "scipy": "scipy"}
print(" ".join(package for module, package in packages.items() if importlib.util.find_spec(module) is None))
PY
)"
if [ ${#missing[@]} -gt 0 ] && [ "${missing[0]}" = "torch==2.13.0" ]; then
  echo "bootstrap: installing torch" >&2
  "$PYTHON" -m pip install -q torch==2.13.0
  missing=("${missing[@]:1}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}" >&2
  "$PYTHON" -m pip install -q "${missing[@]}"
fi
