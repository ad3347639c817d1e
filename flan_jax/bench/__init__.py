"""Benchmarks that print figures (never timed tests), one module per `flan-jax bench` mode.

  decode.py  `bench decode`: cached decoding steps (and transformers' for comparison)
  data.py    `bench data`: the input pipeline
  train.py   `bench train`: the real training step on synthetic batches; with
             plan.py (`--compile_only`) and peft.py (`--peft_compare`)
  common.py  what the train modes share (batches, the compiled step, timing, memory, output)
  kernels.py `bench kernels`: the Pallas attention kernels compiled to PTX (no GPU)
  attention_check.py `bench attention_check`: an attention kernel's output and
             gradients against the einsum path (launch/bench_matrix.py runs it first)

`bench collection` reads a Flan Collection export through tasks/, so it lives
there (tasks/collection_bench.py). Importing this package imports nothing heavy;
each module imports JAX (data.py: TensorFlow and SeqIO when it runs).
"""
