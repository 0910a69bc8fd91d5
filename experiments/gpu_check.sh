#!/usr/bin/env bash
# GPU check (issue 14): on a machine with a GPU, runs the engine / model / layout tests there, then times the decode
# of a randomly initialised Llama-3.1-8B-shaped bfloat16 model at batch 1 and 64 against the HBM roofline
# (weight + KV cache bytes read per step / HBM read bandwidth measured in the same run); then (issue 15) prefills
# 32K- and 128K-token prompts on the same 8B shape through cuDNN flash attention (the whole prompt as one chunk)
# and through the blockwise XLA path (4096-token chunks), time and peak device memory, each in its own process
# (experiments/gpu_long_prefill.py). Well under 10 minutes.
#
#   bash experiments/gpu_check.sh            # from the repository root; needs jax with CUDA (jax[cuda12])
#
# Prints one table; exits non-zero (with the reason) if there is no GPU backend or a test fails.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

backend=$(python -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" != "gpu" ]; then
  echo "gpu_check: JAX backend is '${backend:-unavailable}', not gpu (install jax[cuda12] on the GPU machine)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== tests on $(python -c 'import jax; print(jax.devices()[0].device_kind)')"
timeout 300 python -m pytest -q -x -p no:cacheprovider tests/test_engine.py tests/test_model.py tests/test_layouts.py \
  -k "not smollm2 and not hf and not meta" 2>&1 | tail -5
tests_rc=${PIPESTATUS[0]}

echo "== 8B-shaped bfloat16 decode vs the HBM roofline"
timeout 300 python - <<'PY'
import time, statistics
import jax, jax.numpy as jnp
from flax import nnx
from llama_jax.config import get_preset
from llama_jax.engine import Engine
from llama_jax.model import Llama
from llama_jax import quant

cfg = get_preset("llama3.1-8b")
x = jnp.ones((1024, 1024, 1024), jnp.bfloat16)                     # 2 GiB
f = jax.jit(lambda a: jnp.sum(a, axis=(1, 2), dtype=jnp.float32))
f(x).block_until_ready()
ts = []
for _ in range(10):
    t = time.perf_counter(); f(x).block_until_ready(); ts.append(time.perf_counter() - t)
bw = x.nbytes / statistics.median(ts)
del x
t0 = time.perf_counter()
model = Llama(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)        # random std-0.02 weights (timing only)
wbytes = quant.param_bytes(model)
engine = Engine(model, max_length=1024)
print(f"init {time.perf_counter() - t0:.0f} s; weights {wbytes / 1e9:.2f} GB; HBM read {bw / 1e12:.2f} TB/s; "
      f"layout {engine.model.weight_layout}, stacked {engine.model.is_stacked}")
print(f"| batch | tok/s | step ms | roofline step ms | of roofline |")
print(f"|-------|-------|---------|------------------|-------------|")
prompt, new = list(range(1000, 1128)), 64
for b in (1, 64):
    def run():
        ds = engine.start([prompt] * b, max_new_tokens=new)
        ds.tokens.block_until_ready()
        t = time.perf_counter(); ds = engine.loop(ds); ds.tokens.block_until_ready()
        return (time.perf_counter() - t) / (new - 1), ds.cache
    run()
    step, cache = statistics.median(run()[0] for _ in range(3)), run()[1]
    kv = cache.k.nbytes + cache.v.nbytes                                  # the step reads the whole cache (dense)
    roof = (wbytes + kv) / bw
    print(f"| {b:5d} | {b / step:5.0f} | {step * 1e3:7.2f} | {roof * 1e3:16.2f} | {roof / step:11.2f} |")
PY
bench_rc=$?

echo "== 8B-shaped bfloat16 prefill of 32K and 128K tokens: cuDNN vs blockwise XLA (issue 15)"
timeout 240 python experiments/gpu_long_prefill.py --impl=cudnn --chunk_size=0 --lengths=32768,131072
cudnn_rc=$?
timeout 240 python experiments/gpu_long_prefill.py --impl=blockwise --chunk_size=4096 --lengths=32768,131072
blockwise_rc=$?
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$cudnn_rc" = 0 ] && [ "$blockwise_rc" = 0 ]
