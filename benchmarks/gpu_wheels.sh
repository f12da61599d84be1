#!/usr/bin/env bash
# Run HERE before the GPU check: the wheels the device machine lacks (its image has torch, accelerate and friends,
# not TRL, bitsandbytes, pydantic or datasets; see ../.library/device/KINDS.md), at this project's pinned versions,
# into .whl/ (ignored by git), for `carry: [".whl"]`. Their total must stay under the device tool's 64 MiB with
# the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "$(pin bitsandbytes)" "$(pin trl)" "$(pin transformers)" "$(pin peft)" "$(pin pydantic)" "$(pin pydantic_core)" \
  "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" liger-kernel
du -cb .whl/*.whl | tail -1
