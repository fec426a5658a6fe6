"""Low-bit weight-only matmul kernels. Knows shapes and packed tensors, never plans: nothing here
imports `planner`.

    format.py     the runtime packing format (int32 words along K, fp16/bf16 scales, uint8 zeros)
    reference.py  torch dequantize + matmul: what every kernel is tested against
    cpu.py        CPU path: torch's int4/int8 weight-only ops, unpack-then-matmul otherwise
    triton_wq.py  Triton W{2,3,4,8}A16 GEMV (split-K) and GEMM (imports triton; CUDA, or CPU under
                  TRITON_INTERPRET=1 for tests)
"""
