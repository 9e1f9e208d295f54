"""Benchmarks side by side with peft and the dense baseline: ``python -m benchmarks [--quick] [--json FILE]``.

Every case is a ratio ``ours / peer`` of medians over interleaved repetitions (:mod:`benchmarks.harness`),
so that noise on a shared machine cancels. Cases:

* ``train_step_vs_peft[r=8|64]``, ``train_step_vs_frozen_base[r=8|64]`` (:mod:`benchmarks.cases_train`)
* ``merged_inference_vs_base``, ``unmerged_inference_vs_base`` (:mod:`benchmarks.cases_train`)
* ``peak_memory[r=...]`` (:mod:`benchmarks.memory`; fresh subprocesses)
* ``svd_factored_vs_dense[...]``, ``section7_7b_shaped`` (:mod:`benchmarks.cases_svd`)
* ``packed_sweep_vs_sequential_{ours,peft}[b=...]``, ``packed_sweep_auto_vs_sequential[b=...]``
  (:mod:`benchmarks.cases_packed`, :mod:`lora.packed`)
* ``train_step_under_load[threads=1|2]`` (:mod:`benchmarks.cases_load`)

The run rewrites ``BENCHMARKS.md`` (machine, versions, date, every case's median, min and max, goals not met).
"""
