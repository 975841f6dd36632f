#!/usr/bin/env bash
# llama.cpp's own converters -- convert_hf_to_gguf.py, convert_lora_to_gguf.py, their conversion/ package and
# gguf-py/ -- into .venv/llama.cpp/, taken from the sdist of the installed llama-cpp-python (which vendors the
# llama.cpp it runs), fetched with pip's download and never built. The export tests run them from there
# (or from $MOETUNE_LLAMA_CPP_DIR). Quick when they are already there for the installed version.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
DEST=.venv/llama.cpp
version=$("$PY" -c 'from importlib.metadata import version; print(version("llama_cpp_python"))' 2>/dev/null) || {
  echo "llama_converters: llama-cpp-python is not installed in .venv/; no converters fetched" >&2
  exit 0
}
# the converters' one requirement MoETune's own dependencies lack, sentencepiece, is in the dev extra
if [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$version" ] && [ -f "$DEST/convert_hf_to_gguf.py" ] \
   && [ -f "$DEST/convert_lora_to_gguf.py" ] && [ -d "$DEST/conversion" ] && [ -d "$DEST/gguf-py" ]; then
  exit 0
fi

echo "bootstrap: fetching llama.cpp's converters (llama-cpp-python $version sdist) into $DEST/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip --disable-pip-version-check -q download --no-deps --no-binary llama-cpp-python \
  "llama-cpp-python==$version" -d "$tmp/sdist"
"$PY" - "$tmp/sdist" "$tmp/out" "$version" <<'EOF'
import sys, tarfile
from pathlib import Path

sdist_dir, out, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(sdist,) = sdist_dir.glob("*.tar.gz")
keep = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")
with tarfile.open(sdist) as tar:
    members = []
    for m in tar.getmembers():
        _, sep, rel = m.name.partition("/vendor/llama.cpp/")
        if sep and (m.isfile() or m.isdir()) and any(rel == k or (k.endswith("/") and rel.startswith(k))
                                                   for k in keep):
            m.name = rel
            members.append(m)
    if not any(m.name == "convert_lora_to_gguf.py" for m in members):
        sys.exit(f"llama_converters: {sdist.name} holds no vendor/llama.cpp/convert_lora_to_gguf.py")
    tar.extractall(out, members=members, filter="data")
(out / "VERSION").write_text(version + "\n")
EOF
rm -rf "$DEST.part"
mv "$tmp/out" "$DEST.part"
rm -rf "$DEST"
mv "$DEST.part" "$DEST"
