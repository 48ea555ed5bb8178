"""The kernels compression runs on a worker, on their own ground: they import nothing else of the package.

- `layouts.py`: where each slot's key and value sit in a backend's KV pages (`PageLayout` and its kinds), and what
  the numbers there mean (`LayerQuantization`: full precision, or fp8 with per-tensor scales);
- `compaction.py`: moving kept tokens into a request's leading slots (Triton, and its torch twins);
- `window_attention.py`: the softmax mass window queries give each slot (Triton, and `window_attention_mass`, its
  dense torch twin and reference);
- `families.py`: the torch and Triton families a worker runs, chosen once from `--kv-kernels`;
- `selfcheck.py`: the Triton kernels against the torch ones on the worker's device, before serving.

Each Triton kernel has a torch reference beside its test; every test runs on CPU under `TRITON_INTERPRET=1`.
"""
