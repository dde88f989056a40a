#!/usr/bin/env bash
# Runs on a lent GPU machine through the device tool, from the repository root; results under $OUT.
# Carry: .whl (constriction, pytorch-msssim wheels, compressai's sdist), .gpu (weights, streams, photos, a 256x256
# archive): `python -m benchmarks.device_session prepare` makes both here; run with carry [".gpu", ".whl"].
# See benchmarks/device_session.py for what each step measures.
set -u
export PYTHONUNBUFFERED=1 DIFFPRESS_WEIGHTS=$PWD/.gpu/weights DIFFPRESS_SHARED=$PWD/.gpu/shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# compressai ships no wheel for this Python: build it; if that fails, its Python parts with stub
# coders suffice (training uses only its layers and entropy models, never its rANS).
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
        .whl/compressai-1.2.8.tar.gz > /tmp/compressai-build.log 2>&1; then
    tail -3 /tmp/compressai-build.log
    mkdir -p /tmp/csrc && tar xzf .whl/compressai-1.2.8.tar.gz -C /tmp/csrc
    cp -r /tmp/csrc/compressai-1.2.8/compressai /tmp/site/
    printf 'def pmf_to_quantized_cdf(*args):\n    raise RuntimeError("stub")\n' > /tmp/site/compressai/_CXX.py
    printf 'class _Stub:\n    def __init__(self, *a, **k):\n        raise RuntimeError("stub")\n\n\nBufferedRansEncoder = RansEncoder = RansDecoder = _Stub\n' > /tmp/site/compressai/ans.py
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import compressai, constriction, torch; print('imports ok', torch.__version__)"
if [ -z "${SKIP_CHECK:-}" ]; then
    timeout 150 python3 -m benchmarks.device_session check "$OUT" > /tmp/check.log 2>&1; tail -5 /tmp/check.log
fi
python3 -m benchmarks.device_session train "$OUT" --content-minutes "${CONTENT_MINUTES:-4.0}" \
    --diffusion-minutes "${DIFFUSION_MINUTES:-1.5}" --batch "${BATCH:-16}" --init-from "${INIT_FROM-cdc-hp128}" 2>&1 | grep -E "fit in|\"step\": [0-9]*000,|Error|error" | cut -c1-200
ls -la "$OUT"
