# Sourced by run.sh and test.sh from the repository root: installs what is missing, and nothing when everything is
# there (one Python start, no pip). The dependencies are pyproject.toml's list. torch comes first and alone: on a
# CPU-only machine `torch==2.13.0` resolves to a local CPU build, while a plain `torch` would pull several GB of CUDA
# packages. Then the `speedrun` command: an editable install of this checkout when it (or the payload) is not importable
# from outside the repository, is another checkout's, or its console script is missing. BOOTSTRAP_ANY_CHECKOUT=1 (run.sh,
# which runs train_gpt.py from here and needs no installed copy) accepts another checkout's install: runs started at
# once from several checkouts never reinstall it under each other.
PYTHON=${PYTHON:-python3}
read -r -a bootstrap_missing <<< "$(BOOTSTRAP_ANY_CHECKOUT=${BOOTSTRAP_ANY_CHECKOUT:-0} "$PYTHON" - <<'PY'
import importlib.util, os, re, shutil, sys, sysconfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the list is simple enough to read by hand
    tomllib = None
text = open("pyproject.toml", encoding="utf-8").read()
if tomllib:
    requirements = tomllib.loads(text)["project"]["dependencies"]
else:
    requirements = re.findall(r'^\s*"([^"]+)",?\s*(?:#.*)?$', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)
# import names that differ from the distribution's
module_of = {"huggingface_hub": "huggingface_hub", "pytest-xdist": "xdist"}
missing = []
for requirement in requirements:
    name = re.split(r"[<>=!~ \[;]", requirement, 1)[0]
    if importlib.util.find_spec(module_of.get(name, name).replace("-", "_")) is None:
        missing.append(requirement)
# `import speedrun` and the payload from outside the repository, both from this checkout (sys.path[0] is the
# repository here: drop it for the check)
here = os.path.abspath(os.getcwd())
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
scripts = sysconfig.get_path("scripts")


def from_here(name):
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None and os.path.abspath(spec.origin).startswith(here + os.sep)


if os.environ.get("BOOTSTRAP_ANY_CHECKOUT") == "1":
    installed = importlib.util.find_spec("speedrun") is not None
else:
    installed = from_here("speedrun") and from_here("train_gpt")
if not installed or not (shutil.which("speedrun") or os.path.exists(os.path.join(scripts, "speedrun"))):
    missing.append("SPEEDRUN")
print(" ".join(missing))
PY
)"
if [ ${#bootstrap_missing[@]} -gt 0 ] && [[ "${bootstrap_missing[0]}" == torch* ]]; then
  echo "bootstrap: installing ${bootstrap_missing[0]}" >&2
  "$PYTHON" -m pip install -q "${bootstrap_missing[0]}"
  bootstrap_missing=("${bootstrap_missing[@]:1}")
fi
bootstrap_install_self=0
if [ ${#bootstrap_missing[@]} -gt 0 ] && [ "${bootstrap_missing[-1]}" = SPEEDRUN ]; then
  bootstrap_install_self=1
  unset 'bootstrap_missing[-1]'
fi
if [ ${#bootstrap_missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${bootstrap_missing[*]}" >&2
  "$PYTHON" -m pip install -q "${bootstrap_missing[@]}"
fi
if [ "$bootstrap_install_self" = 1 ]; then
  echo "bootstrap: installing the speedrun command (pip install -e .)" >&2
  "$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation
fi
unset bootstrap_missing bootstrap_install_self
