#!/usr/bin/env bash
# The GPU check: in at most ~8 minutes on one NVIDIA GPU, the `gpu` preset's training step
# (bf16, flash SDPA, torch.compile, micro_batch_size = "auto"), one FSDP2 and one DDP step on
# one device (torchrun --nproc_per_node=1 takes the distributed path), KV-cache generation,
# and the output layer's cross-entropy memory at the preset's shape. Each part prints
# tokens/s, MFU against the GPU's bf16 peak and peak memory; a part that fails is reported
# and the rest still run. Needs no network: synthetic tokens, the GPT-2 vocabulary size.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   LLMCTL_GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # the same parts, tiny, on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${LLMCTL_GPU_CHECK_SMOKE:-0}" = 1 ]; then
  preset=tiny; steps=2; warmup=1; sets=(--set run.device=cpu --set model.vocab_size=320)
  generate=(--device cpu --dtype float32 --prompts 16 --new-tokens 8 --eval-tokens 256)
  ce=(--device cpu --tokens 512 --vocab 1000 --d-model 64)
else
  preset=gpu; steps=30; warmup=5; sets=(--set model.vocab_size=50257 --set 'pretrain.micro_batch_size="auto"')
  generate=(--device cuda --dtype bfloat16 --prompts 64,512 --new-tokens 128)
  ce=(--device cuda --tokens 32768 --vocab 50257 --d-model 768 --dtypes bfloat16 --steps 3)
fi
failed=()
part() {  # part NAME SECONDS COMMAND...: run one part with its own time limit
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name"
  local start=$SECONDS
  if ! timeout "$limit" "$@"; then failed+=("$name"); echo "!!! $name failed or ran past ${limit}s"; fi
  echo "--- $name: $((SECONDS - start))s"
}

part "environment" 60 "$PY" - "$preset" <<'PY'
import sys, torch
from llmctl.config import load_config
from llmctl.model import Transformer
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
if torch.cuda.is_available():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = load_config(sys.argv[1], ["model.vocab_size=50257"])
    model = Transformer(cfg.model).cuda()
    x = torch.randint(0, 50257, (2, cfg.model.max_seq_len), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
        model(x, x).backward()  # raises if flash attention cannot run this model's attention
    print("flash SDPA: forward and backward run at the preset's shape")
PY
part "train step: --preset $preset (bf16, compile, micro-batch auto)" 300 \
  "$PY" -m llmctl bench --preset "$preset" "${sets[@]}" --steps "$steps" --warmup "$warmup"
for strategy in fsdp ddp; do
  part "one-device $strategy step (torchrun --nproc_per_node=1)" 120 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m llmctl bench --preset "$preset" \
    "${sets[@]}" --set run.distributed=$strategy --set run.compile=false --steps 5 --warmup 2
done
part "KV-cache generation" 90 "$PY" benchmarks/bench_generate.py "${generate[@]}" --rounds 1
part "output layer cross-entropy memory" 120 "$PY" benchmarks/bench_cross_entropy.py "${ce[@]}"
echo
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all parts ran"
